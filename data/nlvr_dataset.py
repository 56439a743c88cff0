"""NLVR2: a statement about a pair of images, true or false."""
from __future__ import annotations

import random
from typing import Callable

from data.loading import AnnotationError, RobustDataset, check_entries, join_root, load_image, load_json_list
from data.utils import ensure_annotation, pre_caption

SCHEMA = {'images': list, 'sentence': str, 'label': (str, bool)}
_SWAP_WORDS = {'left': 'right', 'right': 'left'}


class nlvr_dataset(RobustDataset):
    """``(image0, image1, sentence, label)`` with label 1 for 'True'.

    As in the original, every split (evaluation included) swaps the two images with probability
    0.5 (Python's ``random``), exchanging the words 'left' and 'right' in the sentence when it
    mentions them.

    Args:
        transform: image transform.
        image_root: folder the image paths are relative to.
        ann_root: folder with ``nlvr_train.json``, ``nlvr_dev.json`` (split 'val'), ``nlvr_test.json``.
        split: 'train', 'val' or 'test'.
        skip_bad_samples: replace unreadable images by the next readable pair.
    """

    filenames = {'train': 'nlvr_train.json', 'val': 'nlvr_dev.json', 'test': 'nlvr_test.json'}

    def __init__(self, transform: Callable, image_root: str, ann_root: str, split: str,
                 skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        if split not in self.filenames:
            raise ValueError(f'unknown NLVR split {split!r}; expected one of {sorted(self.filenames)}')
        self.ann_file = ensure_annotation(self.filenames[split], ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, SCHEMA, self.ann_file)
        for i, ann in enumerate(self.annotation):
            if len(ann['images']) != 2 or not all(isinstance(p, str) for p in ann['images']):
                raise AnnotationError(f"{self.ann_file}: entry {i} key 'images' must be two paths, got {ann['images']!r}")
            if ann['label'] not in ('True', 'False', True, False):
                raise AnnotationError(f"{self.ann_file}: entry {i} key 'label' has value {ann['label']!r}, "
                                      f"expected 'True' or 'False'")
        self.transform, self.image_root = transform, image_root
        self.max_words = 40

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        image0, image1 = (self.transform(load_image(join_root(self.image_root, p), index, self.ann_file))
                          for p in ann['images'])
        sentence = pre_caption(ann['sentence'], self.max_words)
        label = 1 if ann['label'] in ('True', True) else 0
        if random.random() < 0.5:
            return image0, image1, sentence, label
        return image1, image0, swap_left_right(sentence), label


def swap_left_right(sentence: str) -> str:
    """Exchange the words 'left' and 'right' (whole space-separated words only)."""
    return ' '.join(_SWAP_WORDS.get(word, word) for word in sentence.split(' '))
