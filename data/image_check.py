"""Evaluation images are checked before training: every one must open, or the run stops before its first step.

An unreadable evaluation image used to end a run after a whole training epoch, with no checkpoint. The check
reads each image's header only (``PIL.Image.open`` identifies the format and size without decoding), in
threads, and remembers the files that opened by (size, mtime) in the annotation-index cache folder, so a
second run stats the files and opens only new or changed ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from data.loading import BadSampleError
from engine.atomic import atomic_write_text

__all__ = ['check_images', 'ImageRef']

ImageRef = tuple[str, int, str]  # (image path, annotation index, annotation file)
_SHOWN = 5  # bad files named in the message


def _cache_file(refs: Sequence[ImageRef], cache_dir: Optional[str]) -> Path:
    from data.ann_index import _default_cache_dir
    sources = sorted({os.path.abspath(ann_file) for _, _, ann_file in refs})
    digest = hashlib.sha1('\n'.join(sources).encode()).hexdigest()[:16]
    return Path(cache_dir or _default_cache_dir()) / f'images_ok.{digest}.json'


def _stamp(path: str) -> Optional[list]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _opens(path: str) -> Optional[str]:
    """None if the image opens, else why not."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is read by open; size proves it parsed)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f'{type(e).__name__}: {e}'
    return None


def check_images(refs: Sequence[ImageRef], split: str, cache_dir: Optional[str] = None, workers: int = 16) -> int:
    """Open every image of ``refs``; raise ``BadSampleError`` naming the unreadable ones; return how many opened
    now (the rest came from the cache)."""
    if not refs:
        return 0
    cache = _cache_file(refs, cache_dir)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    refs = [(os.path.abspath(path), index, ann_file) for path, index, ann_file in refs]
    stamps = {path: _stamp(path) for path, _, _ in refs}
    todo = sorted({path for path, stamp in stamps.items() if stamp is not None and known.get(path) != stamp})
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        errors = dict(zip(todo, pool.map(_opens, todo)))
    bad = []
    for path, index, ann_file in refs:
        why = 'no such file' if stamps[path] is None else errors.get(path)
        if why is not None:
            bad.append(f'{path} (annotation index {index} of {ann_file}): {why}')
    ok = {path: stamps[path] for path in stamps if stamps[path] is not None and errors.get(path) is None}
    if ok != known:
        try:
            atomic_write_text(cache, json.dumps(ok), fsync=False)
        except OSError:  # a read-only cache folder costs a re-check next time, nothing else
            pass
    if bad:
        raise BadSampleError(f'{split}: {len(bad)} of {len(refs)} evaluation image(s) cannot be read, so the run '
                             f'stops before training (evaluation splits must be complete):\n  '
                             + '\n  '.join(bad[:_SHOWN]) + (f'\n  ... and {len(bad) - _SHOWN} more' if len(bad) > _SHOWN else ''))
    return len(todo)
