"""COCO Karpathy splits: caption training, caption evaluation and retrieval evaluation."""
from __future__ import annotations

from typing import Callable

from data.loading import (AnnotationError, RobustDataset, check_entries, join_root, load_image, load_json_list,
                          warn_empty_captions)
from data.utils import ensure_annotation, pre_caption

TRAIN_SCHEMA = {'image': str, 'caption': str, 'image_id': (str, int)}
EVAL_SCHEMA = {'image': str, 'caption': list}


def dense_image_index(annotation: list, key: str = 'image_id') -> dict:
    """Map each distinct ``image_id`` to 0..N-1 in order of first appearance (the ITC/ITM targets)."""
    ids: dict = {}
    for ann in annotation:
        ids.setdefault(ann[key], len(ids))
    return ids


def coco_image_id(image_path: str) -> int:
    """The integer COCO id of an image file name, parsed exactly as the original does.

    The last path part is stripped of the *characters* '.', 'j', 'p', 'g' at both ends (the
    original's ``str.strip('.jpg')``) and the last '_'-separated field is the id.
    """
    return int(image_path.split('/')[-1].strip('.jpg').split('_')[-1])


class coco_karpathy_train(RobustDataset):
    """One item per (image, caption) pair: ``(image, prompt + caption, dense image index)``.

    Args:
        transform: image transform (PIL image -> tensor).
        image_root: folder the ``image`` paths are relative to.
        ann_root: folder with ``coco_karpathy_train.json`` (downloaded when missing).
        max_words: caption words kept (``pre_caption``).
        prompt: text prepended to every caption (the captioner's 'a picture of ').
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    filename = 'coco_karpathy_train.json'

    def __init__(self, transform: Callable, image_root: str, ann_root: str, max_words: int = 30,
                 prompt: str = '', skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        self.ann_file = ensure_annotation(self.filename, ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, TRAIN_SCHEMA, self.ann_file)
        warn_empty_captions(self.annotation, self.ann_file, max_words=max_words)
        self.transform, self.image_root = transform, image_root
        self.max_words, self.prompt = max_words, prompt
        self.img_ids = dense_image_index(self.annotation)

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        image = load_image(join_root(self.image_root, ann['image']), index, self.ann_file)
        caption = self.prompt + pre_caption(ann['caption'], self.max_words)
        return self.transform(image), caption, self.img_ids[ann['image_id']]


class coco_karpathy_caption_eval(RobustDataset):
    """Caption evaluation split: ``(image, int COCO image id)``.

    Args:
        transform: image transform.
        image_root: folder the ``image`` paths are relative to.
        ann_root: folder with ``coco_karpathy_{split}.json``.
        split: 'val' or 'test'.
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    filenames = {'val': 'coco_karpathy_val.json', 'test': 'coco_karpathy_test.json'}

    def __init__(self, transform: Callable, image_root: str, ann_root: str, split: str,
                 skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        self.ann_file = ensure_annotation(_split_file(self.filenames, split), ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, EVAL_SCHEMA, self.ann_file)
        self.transform, self.image_root = transform, image_root

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        image = load_image(join_root(self.image_root, ann['image']), index, self.ann_file)
        return self.transform(image), coco_image_id(ann['image'])


class coco_karpathy_retrieval_eval(RobustDataset):
    """Retrieval evaluation split: ``(image, index)`` plus the text list and GT maps.

    Attributes:
        text: every caption, cleaned, in file order.
        image: every image path, in file order.
        txt2img: caption index -> image index.
        img2txt: image index -> list of caption indices.

    Args:
        transform: image transform.
        image_root: folder the ``image`` paths are relative to.
        ann_root: folder with the split's annotation file.
        split: 'val' or 'test'.
        max_words: caption words kept.
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    filenames = {'val': 'coco_karpathy_val.json', 'test': 'coco_karpathy_test.json'}

    def __init__(self, transform: Callable, image_root: str, ann_root: str, split: str, max_words: int = 30,
                 skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        self.ann_file = ensure_annotation(_split_file(self.filenames, split), ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, EVAL_SCHEMA, self.ann_file)
        check_retrieval_captions(self.annotation, self.ann_file)
        self.transform, self.image_root = transform, image_root
        self.text, self.image, self.txt2img, self.img2txt = build_retrieval_maps(self.annotation, max_words)

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        path = join_root(self.image_root, self.annotation[index]['image'])
        return self.transform(load_image(path, index, self.ann_file)), index


def check_retrieval_captions(annotation: list, ann_file: str) -> None:
    """Every gallery image needs at least one caption, each a string: an image without one has no rank to score,
    and found only after the training epoch that precedes the evaluation."""
    for i, ann in enumerate(annotation):
        if not ann['caption']:
            raise AnnotationError(f"{ann_file}: entry {i} ({ann['image']}) has an empty 'caption' list; every "
                                  f"retrieval image needs at least one caption")
        bad = next((c for c in ann['caption'] if not isinstance(c, str)), None)
        if bad is not None:
            raise AnnotationError(f"{ann_file}: entry {i} ({ann['image']}) key 'caption' holds {bad!r} of type "
                                  f"{type(bad).__name__}, expected str")


def build_retrieval_maps(annotation: list, max_words: int) -> tuple[list, list, dict, dict]:
    """Flatten captions and build the image<->text ground-truth maps of a retrieval split."""
    text, image, txt2img, img2txt = [], [], {}, {}
    for img_id, ann in enumerate(annotation):
        image.append(ann['image'])
        img2txt[img_id] = []
        for caption in ann['caption']:
            img2txt[img_id].append(len(text))
            txt2img[len(text)] = img_id
            text.append(pre_caption(caption, max_words))
    return text, image, txt2img, img2txt


def _split_file(filenames: dict, split: str) -> str:
    if split not in filenames:
        raise ValueError(f'unknown split {split!r}; expected one of {sorted(filenames)}')
    return filenames[split]
