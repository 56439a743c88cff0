"""Reading annotation files and images with errors that name the file and the index.

Every dataset derives from :class:`RobustDataset`: a missing or unreadable image is an error
naming the file and the annotation index, or, with ``skip_bad_samples=True``, a logged and counted
replacement by the next readable sample (so batch shapes hold and no rank waits on another).
A malformed annotation entry is always an error: a wrong file must never train silently.
"""
from __future__ import annotations

import json
import logging
import os
import random
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

# After this many unreadable samples in a row the data is broken, not noisy.
MAX_CONSECUTIVE_BAD = 100


class AnnotationError(ValueError):
    """An annotation file or entry does not have the expected format."""


class BadSampleError(RuntimeError):
    """An image or video of a well-formed entry cannot be read (``path``: the file, when one is at fault)."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # DataLoader workers and process groups pickle errors
        return type(self), (str(self), self.path)


def load_json_list(path: str) -> list:
    """Read a JSON list (``.json``) or JSON lines (``.jsonl``) annotation file.

    Raises:
        AnnotationError: the file is not valid JSON or not a list.
    """
    try:
        with open(path, encoding='utf-8') as f:
            if path.endswith('.jsonl'):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f'{path}: not valid JSON ({e})') from e
    if not isinstance(data, list):
        raise AnnotationError(f'{path}: expected a JSON list of entries, got {type(data).__name__}')
    return data


def check_entry(entry: Any, schema: Mapping[str, type | tuple], path: str, index: int) -> None:
    """Check that ``entry`` is a dict holding every key of ``schema`` with a value of its type.

    Raises:
        AnnotationError: naming the file, the entry index, the key and the offending value.
    """
    if not isinstance(entry, dict):
        raise AnnotationError(f'{path}: entry {index} is a {type(entry).__name__}, expected an object')
    for key, types in schema.items():
        if key not in entry:
            raise AnnotationError(f'{path}: entry {index} has no key {key!r} (keys: {sorted(entry)})')
        if not isinstance(entry[key], types) or isinstance(entry[key], bool) and bool not in _as_tuple(types):
            raise AnnotationError(f'{path}: entry {index} key {key!r} has value {entry[key]!r} of type '
                                  f'{type(entry[key]).__name__}, expected {_type_names(types)}')


def check_entries(entries: Sequence, schema: Mapping[str, type | tuple], path: str) -> None:
    """:func:`check_entry` on every entry of a list."""
    for index, entry in enumerate(entries):
        check_entry(entry, schema, path, index)


def warn_empty_captions(entries: Sequence, path: str, key: str = 'caption', max_words: int = 30) -> int:
    """Warn once per file, with their number, about entries whose caption is empty after cleaning (a caption of
    only punctuation or spaces trains the model to say nothing); return that number."""
    from data.utils import pre_caption
    empty = [i for i, entry in enumerate(entries)
             if isinstance(entry.get(key), str) and not pre_caption(entry[key], max_words)]
    if empty:
        logger.warning('%s: %d of %d entries have an empty %r (e.g. entry %s); they train as empty captions',
                       path, len(empty), len(entries), key, ', '.join(map(str, empty[:5])))
    return len(empty)


def _as_tuple(types: type | tuple) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple) -> str:
    return ' or '.join(t.__name__ for t in _as_tuple(types))


# the error of one unreadable training image says how to go on without it
SKIP_HINT = ' (skip_bad_samples: true skips unreadable training samples; evaluation splits must be complete)'


@contextmanager
def lenient_decoding() -> Iterator[None]:
    """PIL decodes truncated files (grey where data is missing) and skips its size limit, then the
    settings are restored: only pretraining on web images opts in, as the original does for all of them (tar
    shards bound the size themselves, from the header: ``data.shards.open_checked``)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = True, None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str, index: int, ann_file: str, lenient: bool = False) -> Image.Image:
    """Open an image as RGB, fully decoded so that corrupt files fail here and not in a worker later.

    ``lenient``: accept truncated and very large files (pretraining web data); otherwise a truncated
    file is an error, not an image that is partly grey.

    Raises:
        BadSampleError: naming the image file, the annotation index and the annotation file.
    """
    try:
        with lenient_decoding() if lenient else nullcontext(), Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSampleError(f'cannot read image {path} (annotation index {index} of {ann_file}): '
                             f'{type(e).__name__}: {e}{SKIP_HINT}', path=path) from e


class RobustDataset(Dataset):
    """Base class: ``__getitem__`` calls ``load_item`` and applies the bad-sample policy.

    With ``skip_bad_samples`` an unreadable sample is replaced by one drawn at random from the dataset (seeded by
    the epoch and the index, so a resumed epoch draws the same), never by its neighbour: twenty bad files in a row
    all became the same entry. A file known to be bad is not read again in this process.

    Attributes:
        skip_bad_samples: replace unreadable samples instead of raising.
        num_bad_samples: distinct unreadable files met (per process: each DataLoader worker counts in its own
            copy of the dataset; ``bad_sample_report`` collects them across workers for the epoch's log line).
        bad_sample_report: a JSON-lines file every process appends each new bad file to (set by the runner).
    """

    def __init__(self, skip_bad_samples: bool = False):
        self.skip_bad_samples = bool(skip_bad_samples)
        self.bad_sample_report: Optional[str] = None
        self._bad_files: set = set()
        self._bad_indices: set = set()
        self._epoch = 0

    @property
    def num_bad_samples(self) -> int:
        return len(self._bad_files)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _record_bad(self, index: int, error: BadSampleError) -> None:
        self._bad_indices.add(index)
        key = error.path or f'index {index}'
        if key in self._bad_files:
            return
        self._bad_files.add(key)
        logger.warning('skipping unreadable sample (%d distinct file(s) in this process so far): %s',
                       len(self._bad_files), error)
        if self.bad_sample_report:
            with open(self.bad_sample_report, 'a', encoding='utf-8') as f:  # one short O_APPEND write per file
                f.write(json.dumps({'file': key, 'index': index}) + '\n')

    def load_item(self, index: int):
        raise NotImplementedError

    def image_files(self) -> list[tuple[str, int, str]]:
        """(path, annotation index, annotation file) of every image the split reads, for the check of evaluation
        splits before training (``data.image_check``): entries' ``image`` or ``images`` under ``image_root``."""
        annotation, root = getattr(self, 'annotation', None), getattr(self, 'image_root', None)
        if not isinstance(annotation, list) or root is None:
            return []
        ann_file = getattr(self, 'ann_file', '')
        return [(join_root(root, path), index, ann_file) for index, entry in enumerate(annotation)
                for path in ([entry['image']] if 'image' in entry else entry.get('images', []))]

    def __getitem__(self, index: int):
        if not self.skip_bad_samples:
            return self.load_item(index)
        draw = random.Random((self._epoch, index).__hash__())  # ints only: the same in every process
        candidate, failures, limit = index, 0, min(len(self), MAX_CONSECUTIVE_BAD)
        for _ in range(20 * limit):  # draws of known-bad indices cost no read
            if candidate not in self._bad_indices:
                try:
                    return self.load_item(candidate)
                except BadSampleError as e:
                    self._record_bad(candidate, e)
                    failures += 1
            if failures >= limit or len(self._bad_indices) >= len(self):
                break
            candidate = draw.randrange(len(self))
        raise BadSampleError(f'{type(self).__name__}: {min(len(self), MAX_CONSECUTIVE_BAD)} consecutive '
                             f'unreadable samples starting at index {index}; the data is broken')


def join_root(root: str, path: str) -> str:
    """``os.path.join`` that leaves absolute paths alone (as the original's joins do)."""
    return os.path.join(root, path) if root else path


@contextmanager
def seeded_augmentation(seed: int, epoch: int, sample_id: int) -> Iterator[None]:
    """Seed torch's and numpy's global RNGs (what torchvision's random transforms and RandomAugment draw from)
    by (seed, epoch, sample id) for one sample, and restore them afterwards: a sample's augmentation is a function
    of its id, not of which worker made it or how many samples that worker made before."""
    mixed = np.random.SeedSequence([seed, epoch, sample_id]).generate_state(2)
    # the CPU generator only: torch.manual_seed / fork_rng also reach CUDA's, ~2 ms a sample
    cpu = torch.default_generator
    torch_state, np_state = cpu.get_state(), np.random.get_state()
    cpu.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))
    np.random.seed(int(mixed[0]))
    try:
        yield
    finally:
        cpu.set_state(torch_state)
        np.random.set_state(np_state)


class SharedInts:
    """A few integers that the training process sets and its DataLoader workers read when they use them.

    A worker works on its own copy of the dataset, made when it starts; with ``persistent_workers`` that is once per
    run, so an attribute set between epochs (``set_epoch``) would stay at its first value there. These live in
    shared memory (inherited by forked workers, passed by handle to spawned ones)."""

    def __init__(self, n: int):
        self._values = torch.zeros(n, dtype=torch.int64).share_memory_()

    def __getitem__(self, i: int) -> int:
        return int(self._values[i])

    def __setitem__(self, i: int, value: int) -> None:
        self._values[i] = int(value)



def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a loader's kept (``persistent_workers``) worker processes now.

    Left alive, they are shut down by the iterator's finaliser during interpreter exit, after the process group is
    gone; a script that keeps workers stops them before ``Run.finish`` so that the end of a run is ordered.
    DataLoader has no public call for this: its iterator's ``_shutdown_workers`` is what its own finaliser runs."""
    iterator = getattr(loader, '_iterator', None)
    if iterator is not None and hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()
    loader._iterator = None
