"""Your own image-caption pairs (a JSON list or webdataset tar shards) as the captioning and retrieval splits.

One config key does it: ``--options own_data=PATH`` on ``train_caption.py`` or ``train_retrieval.py`` (README,
"Fine-tune on your own images"). ``PATH`` is either

* a JSON list (``.json``) or JSON lines (``.jsonl``) of ``{"image": path, "caption": text}``, an image repeated
  for each of its captions; relative image paths are relative to the list's folder; or
* local tar shards in img2dataset's webdataset layout (``KEY.jpg`` + ``KEY.txt``), a brace pattern allowed
  (``/data/mine/{00000..00009}.tar``); a sample's image id is its shard and key.

5% of the images (not pairs; at least 1, at most 1000) are held out for val and as many for test, drawn with a fixed
seed, so the same input always gives the same split. The run writes what the COCO Karpathy readers expect under
``OUTPUT_DIR/own_data``: ``images/own_NNNNNN.jpg`` (links to your files; held-out shard images are copied out of
their tar: evaluation needs finite files), ``annotation/coco_karpathy_{train,val,test}.json`` and
``annotation/coco_gt/coco_karpathy_{val,test}_gt.json`` (the caption evaluation reads an image's id from its file
name, as the original does with COCO's). Training on shards reads each image straight from its tar at the byte
offset found when the run starts (every run indexes the tar headers again), never extracted. The same folder can
be written without a run:

    python -m data.own_data my_pairs.json --out output/my_data [--image_root /photos] [--val 50 --test 50]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from braceexpand import braceexpand

from data.coco_karpathy_dataset import (coco_karpathy_caption_eval, coco_karpathy_retrieval_eval,
                                        coco_karpathy_train, dense_image_index)
from data.loading import (AnnotationError, BadSampleError, RobustDataset, check_entries, load_image, load_json_list)
from data.utils import pre_caption
from engine.atomic import atomic_write_text

SCHEMA = {'image': str, 'caption': str}
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
SHARD_TRAIN_FILE = 'own_shard_train.json'
FOLDER = 'own_data'   # under --output_dir


@dataclass
class OwnImage:
    """One distinct image and its captions: a file (``path``) or a tar member (``shard``, ``key``, byte range)."""
    captions: list[str]
    path: str = ''
    shard: str = ''
    key: str = ''
    offset: int = 0
    size: int = 0
    name: str = ''      # own_NNNNNN.jpg, set by :func:`plan_own_data`

    @property
    def image_id(self) -> str:
        """What makes two pairs the same image for the ITC targets: the file, or the shard and key."""
        return self.path or f'{self.shard}#{self.key}'

    def read(self) -> bytes:
        with open(self.shard, 'rb') as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class OwnPlan:
    """The images of a source and their split (``splits['train'|'val'|'test']``: lists of :class:`OwnImage`)."""
    source: str
    kind: str                        # 'list' or 'shards'
    splits: dict = field(default_factory=dict)
    skipped: int = 0                 # shard samples without an image or a caption


def source_kind(source: str) -> str:
    """'list' for a ``.json`` / ``.jsonl`` file, 'shards' for ``.tar`` shards (brace patterns allowed)."""
    if source.endswith(('.json', '.jsonl')):
        return 'list'
    if source.endswith('.tar'):
        return 'shards'
    raise AnnotationError(f'own_data {source!r}: expected a JSON list (.json / .jsonl) of {{"image", "caption"}} or '
                          f'webdataset tar shards (.tar, e.g. /data/mine/{{00000..00009}}.tar)')


def list_images(pairs_file: str, image_root: str = '') -> list[OwnImage]:
    """The distinct images of a pairs file, in order of first appearance, each with its captions; every image
    file must exist."""
    if not os.path.isfile(pairs_file):
        raise FileNotFoundError(f'own_data: no such file {pairs_file!r}')
    pairs = load_json_list(pairs_file)
    check_entries(pairs, SCHEMA, pairs_file)
    root = Path(image_root or Path(pairs_file).parent).absolute()
    grouped: dict[str, OwnImage] = {}
    for index, pair in enumerate(pairs):
        image = pair['image']
        if image not in grouped:
            source = Path(image) if os.path.isabs(image) else root / image
            if not source.is_file():
                raise FileNotFoundError(f'{pairs_file}: entry {index}: image {image} not found (looked at {source}; '
                                        f'relative paths are relative to {root})')
            grouped[image] = OwnImage([], path=str(source))
        grouped[image].captions.append(pair['caption'])
    return list(grouped.values())


def shard_images(pattern: str) -> tuple[list[OwnImage], int]:
    """Every sample of the local tar shards of ``pattern`` that has an image and a caption (webdataset's grouping:
    a member's key is its path up to the first dot of its file name), and the number of samples without one."""
    urls = list(braceexpand(pattern))
    images: list[OwnImage] = []
    skipped = 0
    for url in urls:
        if url.startswith(('pipe:', 'http://', 'https://', 's3://', 'gs://')):
            raise AnnotationError(f'own_data {url!r}: only local tar files can be read (training reads images '
                                  f'at their byte offsets)')
        if not os.path.isfile(url):
            raise FileNotFoundError(f'own_data: no such shard file {url!r} (from {pattern!r})')
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(url, 'r:') as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition('.')
                    sample = samples.setdefault(os.path.join(folder, stem), {})
                    if ext.lower() in IMAGE_EXTENSIONS and 'image' not in sample:
                        sample['image'] = (member.offset_data, member.size)
                    elif ext.lower() == 'txt':
                        sample['caption'] = tar.extractfile(member).read().decode('utf-8', errors='replace')
        except tarfile.TarError as e:
            raise AnnotationError(f'own_data: {url} is not an uncompressed tar file ({e})') from None
        for key, sample in samples.items():
            if 'image' not in sample or not sample.get('caption', '').strip():
                skipped += 1
                continue
            offset, size = sample['image']
            images.append(OwnImage([sample['caption'].strip()], shard=os.path.abspath(url), key=key, offset=offset,
                                   size=size))
    return images, skipped


def plan_own_data(source: str, image_root: str = '', n_val: Optional[int] = None, n_test: Optional[int] = None,
                  seed: int = 0) -> OwnPlan:
    """Read and check ``source`` (see the module docstring) and split its images; writes nothing."""
    kind = source_kind(source)
    skipped = 0
    if kind == 'list':
        images = list_images(source, image_root)
    else:
        images, skipped = shard_images(source)
    if len(images) < 3:
        lacking = f'; {skipped} samples lack an image or caption' if skipped else ''
        raise AnnotationError(f'own_data {source}: {len(images)} usable images; at least 3 are needed '
                              f'(train, val, test){lacking}')
    default = min(1000, max(1, len(images) // 20))
    n_val, n_test = n_val or default, n_test or default
    if n_val + n_test >= len(images):
        raise AnnotationError(f'own_data {source}: {len(images)} images cannot hold out {n_val} val + {n_test} '
                              f'test images')
    for k, image in enumerate(images):
        image.name = f'own_{k:06d}.jpg'   # .jpg whatever the format: the caption evaluation parses ids this way
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    held = {'val': order[:n_val], 'test': order[n_val:n_val + n_test], 'train': order[n_val + n_test:]}
    return OwnPlan(source, kind, {split: [images[i] for i in sorted(ix)] for split, ix in held.items()}, skipped)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj), fsync=False)  # rebuilt by a rerun: no need to wait for the disk


def coco_gt(images: list[OwnImage]) -> dict:
    """The COCO caption ground truth pycocoevalcap reads; ids are the numbers in the ``own_NNNNNN`` names."""
    entries = [{'id': int(i.name[4:10]), 'file_name': i.name} for i in images]
    annotations = []
    for entry, image in zip(entries, images):
        for caption in image.captions:
            annotations.append({'image_id': entry['id'], 'caption': caption, 'id': len(annotations)})
    return {'info': {'description': 'own data'}, 'licenses': [], 'type': 'captions', 'images': entries,
            'annotations': annotations}


def write_own_data(plan: OwnPlan, out: str | Path) -> dict:
    """Write ``plan``'s files into ``out`` (module docstring); returns the counts of images per split and of
    training pairs. Files are replaced atomically, so a rerun (a resumed run) rewrites the same folder."""
    out = Path(out)
    images_dir, ann = out / 'images', out / 'annotation'
    images_dir.mkdir(parents=True, exist_ok=True)
    for split in ('val', 'test') if plan.kind == 'shards' else ('train', 'val', 'test'):
        for image in plan.splits[split]:
            target = images_dir / image.name
            tmp = target.with_name(f'{target.name}.{os.getpid()}.tmp')
            if tmp.is_symlink() or tmp.exists():   # left by a killed run of the same pid
                tmp.unlink()
            if image.path:
                tmp.symlink_to(image.path)
            else:
                tmp.write_bytes(image.read())
            os.replace(tmp, target)
    train = plan.splits['train']
    if plan.kind == 'list':
        write_json(ann / 'coco_karpathy_train.json', [{'image': i.name, 'caption': c, 'image_id': i.name[:-4]}
                                                      for i in train for c in i.captions])
    else:
        write_json(ann / SHARD_TRAIN_FILE, [{'shard': i.shard, 'key': i.key, 'offset': i.offset, 'size': i.size,
                                             'caption': c, 'image_id': i.image_id} for i in train for c in i.captions])
    for split in ('val', 'test'):
        write_json(ann / f'coco_karpathy_{split}.json', [{'image': i.name, 'caption': i.captions}
                                                         for i in plan.splits[split]])
        write_json(ann / 'coco_gt' / f'coco_karpathy_{split}_gt.json', coco_gt(plan.splits[split]))
    return {'train_images': len(train), 'val_images': len(plan.splits['val']),
            'test_images': len(plan.splits['test']), 'train_pairs': sum(len(i.captions) for i in train),
            'skipped_samples': plan.skipped}


def prepare_own_data(pairs_file: str, out: str, image_root: str = '', n_val: Optional[int] = None,
                     n_test: Optional[int] = None, seed: int = 0) -> dict:
    """:func:`plan_own_data` then :func:`write_own_data` into ``out``; returns the counts."""
    return write_own_data(plan_own_data(pairs_file, image_root, n_val, n_test, seed), out)


class own_shard_train(RobustDataset):
    """Training pairs read from tar shards at their byte offsets: ``(image, prompt + caption, dense image index)``,
    the items of :class:`data.coco_karpathy_dataset.coco_karpathy_train`.

    Args:
        transform: image transform.
        ann_file: the index written by :func:`write_own_data` (``own_shard_train.json``).
        max_words: caption words kept.
        prompt: text prepended to every caption.
        skip_bad_samples: replace unreadable images by another readable one.
    """

    def __init__(self, transform: Callable, ann_file: str, max_words: int = 30, prompt: str = '',
                 skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        self.ann_file = ann_file
        self.annotation = load_json_list(ann_file)
        check_entries(self.annotation, {'shard': str, 'key': str, 'offset': int, 'size': int, 'caption': str,
                                        'image_id': str}, ann_file)
        self.transform, self.max_words, self.prompt = transform, max_words, prompt
        self.img_ids = dense_image_index(self.annotation)

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        where = f"{ann['shard']} sample {ann['key']}"
        try:
            with open(ann['shard'], 'rb') as f:
                f.seek(ann['offset'])
                data = f.read(ann['size'])
        except OSError as e:
            raise BadSampleError(f'cannot read {where} (index {index} of {self.ann_file}): {e}', path=where) from e
        try:
            image = load_image(io.BytesIO(data), index, self.ann_file)
        except BadSampleError as e:
            raise BadSampleError(f'cannot decode the image of {where}: {e}', path=where) from None
        caption = self.prompt + pre_caption(ann['caption'], self.max_words)
        return self.transform(image), caption, self.img_ids[ann['image_id']]


def own_datasets(task: str, config: Any, folder: str | Path) -> tuple:
    """(train, val, test) of ``task`` ('caption' or 'retrieval') from a folder :func:`write_own_data` wrote, with the
    config's ``image_root`` / ``ann_root`` (and ``coco_gt_root`` for captions) pointed at it: the scripts read those
    keys later (the caption evaluation's ground truth)."""
    from transform import create_transforms

    folder = Path(folder)
    config.image_root, config.ann_root = str(folder / 'images'), str(folder / 'annotation')
    if task == 'caption':
        config.coco_gt_root = str(folder / 'annotation' / 'coco_gt')
    train_t, test_t = create_transforms(config.image_size)
    skip, prompt = bool(config.get('skip_bad_samples', False)), config.get('prompt', '') if task == 'caption' else ''
    shard_index = folder / 'annotation' / SHARD_TRAIN_FILE
    if source_kind(config.own_data) == 'shards':
        train = own_shard_train(train_t, str(shard_index), prompt=prompt, skip_bad_samples=skip)
    else:
        train = coco_karpathy_train(train_t, config.image_root, config.ann_root, prompt=prompt, skip_bad_samples=skip)
    evaluation = coco_karpathy_caption_eval if task == 'caption' else coco_karpathy_retrieval_eval
    return train, *(evaluation(test_t, config.image_root, config.ann_root, split) for split in ('val', 'test'))


# the datasets a script asks the registry for -> what own data stands in for
OWN_TASKS = {'caption_coco': 'caption', 'retrieval_coco': 'retrieval', 'retrieval_flickr': 'retrieval'}


def own_task(dataset: str) -> str:
    if dataset not in OWN_TASKS:
        raise AnnotationError(f'own_data trains captioning and retrieval only, not {dataset!r}')
    return OWN_TASKS[dataset]


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('pairs', help='JSON list / JSON lines of {"image", "caption"}, or tar shards')
    parser.add_argument('--out', required=True)
    parser.add_argument('--image_root', default='', help="relative image paths' folder (default: the file's)")
    parser.add_argument('--val', type=int, default=None, help='held-out val images (default 5%%)')
    parser.add_argument('--test', type=int, default=None, help='held-out test images (default 5%%)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = prepare_own_data(args.pairs, args.out, args.image_root, args.val, args.test, args.seed)
    except (AnnotationError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    print(json.dumps(counts))
    return counts


if __name__ == '__main__':
    main(sys.argv[1:])
