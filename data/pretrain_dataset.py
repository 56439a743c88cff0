"""Pretraining image-text pairs from JSON lists / JSON lines, plus rotating LAION shards.

The lists are read through :class:`data.ann_index.AnnotationIndex` (memory-mapped, decoded lazily),
so 100M+ entries cost every rank and worker about 8 bytes each instead of a Python dict each.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Optional, Sequence, Union

from data.ann_index import AnnotationIndex, ConcatIndex
from data.loading import (BadSampleError, RobustDataset, SharedInts, check_entry, join_root, load_image,
                          seeded_augmentation)
from data.utils import pre_caption


def check_pretrain_entry(entry, path: str, index: int) -> None:
    """A pretraining entry is an object with a str ``caption`` and a str ``image`` or ``url``."""
    check_entry(entry, {'caption': str}, path, index)
    key = 'image' if 'image' in entry else 'url'
    check_entry(entry, {key: str}, path, index)


def load_annotation_index(ann_files: Union[str, Sequence[str]], cache_dir: Optional[str] = None) -> ConcatIndex:
    """Compact lazily-decoded view of one or several pretraining annotation files.

    Args:
        ann_files: a path or a list of paths (``.json`` lists or ``.jsonl``).
        cache_dir: where to keep the converted indexes (default: next to each file).

    Returns:
        A sequence of entry dicts (decoded on access), in file order.
    """
    files = [ann_files] if isinstance(ann_files, (str, os.PathLike)) else list(ann_files)
    return ConcatIndex([AnnotationIndex(str(f), cache_dir, validate=check_pretrain_entry) for f in files])


class pretrain_dataset(RobustDataset):
    """``(image, pre_caption(caption, 30))`` for every entry of the pretraining files.

    Args:
        ann_file: list of annotation files (entries ``{'image' or 'url': path, 'caption': str}``).
        laion_path: folder of LAION shard files (``*.json``/``*.jsonl``); one shard is used per epoch
            (shard ``epoch % n``), the first at construction. '' for none.
        transform: image transform.
        max_words: caption words kept.
        image_root: folder relative image paths are joined to ('' = as written, like the original).
        cache_dir: where to keep the compact indexes (default next to each annotation file).
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    def __init__(self, ann_file: Sequence[str], laion_path: str, transform: Callable, max_words: int = 30,
                 image_root: str = '', cache_dir: Optional[str] = None, skip_bad_samples: bool = False):
        self._shared = SharedInts(1)   # the epoch, seen by persistent loader workers too
        super().__init__(skip_bad_samples)
        self.ann_pretrain = load_annotation_index(ann_file, cache_dir)
        self.transform, self.max_words = transform, max_words
        self.image_root, self.cache_dir = image_root, cache_dir
        self.laion_path = laion_path
        self.laion_files = []
        if laion_path:
            # Sorted (the original's glob order is arbitrary) so every rank rotates identically.
            self.laion_files = sorted(glob.glob(os.path.join(laion_path, '*.json')) +
                                      glob.glob(os.path.join(laion_path, '*.jsonl')))
            if not self.laion_files:
                raise FileNotFoundError(f'laion_path {laion_path} holds no *.json / *.jsonl shard files')
        self.reload_laion(0)
        # the augmentation of entry i in epoch e is seeded by (seed, e, i): the same draws whichever loader worker
        # reads it and however many samples that worker read before, so a resumed run continues exactly
        self.seed = 0

    @property
    def epoch(self) -> int:
        return self._shared[0]

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._shared[0] = epoch

    @property
    def _epoch(self) -> int:   # RobustDataset's replacement draws follow the same epoch
        return self.epoch

    @_epoch.setter
    def _epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reload_laion(self, epoch: int) -> None:
        """Use LAION shard ``epoch % len(laion_files)`` together with the fixed pretraining files."""
        parts = list(self.ann_pretrain.parts)
        if self.laion_files:
            shard = self.laion_files[epoch % len(self.laion_files)]
            print(f'loading LAION shard {shard}')
            parts.append(AnnotationIndex(shard, self.cache_dir, validate=check_pretrain_entry))
        self.annotation = ConcatIndex(parts)

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        part, local = self.annotation.locate(index)
        source = self.annotation.parts[part].source
        ann = self.annotation.parts[part][local]
        path = ann['image'] if 'image' in ann else ann['url']
        if path.startswith(('http://', 'https://')):
            raise BadSampleError(f'image {path} (annotation index {local} of {source}) is a remote URL; '
                                 f'download the images first and point the entries at local files')
        # as in the original, web images that are truncated or huge are decoded as far as they go (the original
        # set this for every dataset in the process; here it is local to pretraining reads)
        image = load_image(join_root(self.image_root, path.removeprefix('file://')), local, source, lenient=True)
        with seeded_augmentation(self.seed, self.epoch, index):
            return self.transform(image), pre_caption(ann['caption'], self.max_words)
