"""A compact, memory-mapped index of a large annotation list (100M+ entries).

A JSON list (``.json``) or JSON-lines (``.jsonl``) file is converted once into two files:
``<name>.blob`` (each entry re-encoded as compact UTF-8 JSON, back to back) and
``<name>.offsets.npy`` (int64 start offsets, one more than entries). Both are memory-mapped,
so every rank and every DataLoader worker shares the page cache instead of holding 100M Python
dicts, and an entry is decoded only when ``__getitem__`` asks for it. The conversion streams the
source (it never holds the list), writes to temporary files and publishes them with ``os.replace``
(offsets last: they are the marker), so concurrent ranks and interrupted runs are safe; the cache is
reused while it is newer than the source.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from data.loading import AnnotationError
from engine.atomic import atomic_write

Validator = Callable[[Any, str, int], None]
_READ_CHUNK = 1 << 22
# An entry longer than this is a broken file, not a big entry: stop reading instead of buffering it all.
_MAX_ENTRY_CHARS = 1 << 26


def iter_json_entries(path: str) -> Iterator[Any]:
    """Yield the entries of a JSON list or JSON-lines file without loading the whole file.

    Raises:
        AnnotationError: naming the file and entry index of invalid JSON.
    """
    if path.endswith('.jsonl'):
        yield from _iter_json_lines(path)
    else:
        yield from _iter_json_array(path)


def _iter_json_lines(path: str) -> Iterator[Any]:
    with open(path, encoding='utf-8') as f:
        index = 0
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f'{path}: entry {index} (line {line_no}) is not valid JSON: {e}') from e
            index += 1


def _iter_json_array(path: str) -> Iterator[Any]:
    """Stream a top-level JSON array with ``raw_decode`` over a growing buffer."""
    decoder = json.JSONDecoder()
    with open(path, encoding='utf-8') as f:
        buf, pos, eof = '', 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(_READ_CHUNK)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return not eof

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in ' \t\r\n':
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ''

        if next_char() != '[':
            raise AnnotationError(f'{path}: expected a JSON list (first character is not "[")')
        pos += 1
        index = 0
        if next_char() == ']':
            return
        while True:
            next_char()
            try:
                entry, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:
                    raise ValueError('entry may continue in the next chunk')
            except ValueError as e:
                if len(buf) - pos < _MAX_ENTRY_CHARS and fill():
                    continue
                raise AnnotationError(f'{path}: entry {index} is not valid JSON: {e}') from e
            yield entry
            pos, index = end, index + 1
            sep = next_char()
            if sep == ']':
                return
            if sep != ',':
                raise AnnotationError(f'{path}: expected "," or "]" after entry {index - 1}, found {sep!r}')
            pos += 1


def cache_paths(source: str, cache_dir: Optional[str] = None) -> tuple[Path, Path]:
    """Where the index of ``source`` lives: next to it, or in ``cache_dir`` when it is given.

    In a cache dir the names carry a hash of the source's absolute path so that equal file names
    from different folders do not collide.
    """
    src = Path(source)
    if cache_dir is None:
        base = src
    else:
        digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16]
        base = Path(cache_dir) / f'{src.name}.{digest}'
    return base.with_name(base.name + '.offsets.npy'), base.with_name(base.name + '.blob')


def _default_cache_dir() -> str:
    return os.environ.get('BLIP_ANN_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'blip', 'ann_index'))


def _source_stamp(source: str) -> dict:
    """What identifies one version of an annotation file: an index built from another is stale. An mtime
    comparison alone is not enough: ``cp -p``, ``rsync -a`` or ``tar x`` put back a file with an older one."""
    st = os.stat(source)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'inode': st.st_ino}


def _stamp_path(offsets_path: Path) -> Path:
    return offsets_path.with_name(offsets_path.name + '.source.json')


def _is_fresh(source: str, offsets_path: Path, blob_path: Path) -> bool:
    stamp = _stamp_path(offsets_path)
    if not (offsets_path.is_file() and blob_path.is_file() and stamp.is_file()):
        return False
    try:
        if json.loads(stamp.read_text()) != _source_stamp(source):
            return False
    except ValueError:  # a torn or foreign stamp: rebuild
        return False
    offsets = np.load(offsets_path, mmap_mode='r')
    return len(offsets) >= 1 and int(offsets[-1]) == blob_path.stat().st_size


def build_index(source: str, offsets_path: Path, blob_path: Path, validate: Optional[Validator] = None) -> int:
    """Convert ``source`` into ``(offsets_path, blob_path)``; returns the number of entries.

    Args:
        source: a ``.json`` list or ``.jsonl`` file.
        offsets_path: output int64 ``.npy`` file of ``N + 1`` byte offsets.
        blob_path: output file of concatenated compact-JSON entries.
        validate: called as ``validate(entry, source, index)``; raises on a malformed entry.
    """
    offsets_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _source_stamp(source)  # taken before reading: a file changed meanwhile makes the index stale
    offsets = array('q', [0])
    # a cache that can be rebuilt: no fsync. A failed entry check publishes nothing.
    with atomic_write(blob_path, fsync=False) as blob:
        for index, entry in enumerate(iter_json_entries(source)):
            if validate is not None:
                validate(entry, source, index)
            data = json.dumps(entry, ensure_ascii=False, separators=(',', ':')).encode('utf-8')
            blob.write(data)
            offsets.append(offsets[-1] + len(data))
    with atomic_write(offsets_path, fsync=False) as f:
        np.save(f, np.frombuffer(offsets, dtype=np.int64))
    with atomic_write(_stamp_path(offsets_path), binary=False, fsync=False) as f:
        json.dump(stamp, f)  # last: an index without its (matching) stamp is rebuilt
    return len(offsets) - 1


class AnnotationIndex(Sequence):
    """Read-only sequence of the entries of one annotation file, decoded lazily from a memory map.

    Holds only two memory maps and a few integers; pickles (for DataLoader workers) as its paths.

    Args:
        source: a ``.json`` list or ``.jsonl`` annotation file.
        cache_dir: where to put the index; default next to ``source``, falling back to
            ``$BLIP_ANN_CACHE`` (or ``~/.cache/blip/ann_index``) when that folder is not writable.
        validate: entry check run once while converting (raises naming file and index).
    """

    def __init__(self, source: str, cache_dir: Optional[str] = None, validate: Optional[Validator] = None):
        self.source = str(source)
        if not os.path.isfile(self.source):
            raise FileNotFoundError(f'annotation file {self.source} does not exist')
        if cache_dir is None and not os.access(os.path.dirname(os.path.abspath(self.source)), os.W_OK):
            cache_dir = _default_cache_dir()
        self.offsets_path, self.blob_path = cache_paths(self.source, cache_dir)
        if not _is_fresh(self.source, self.offsets_path, self.blob_path):
            build_index(self.source, self.offsets_path, self.blob_path, validate)
        self._offsets = self._blob = None
        self._len = len(self._open()[0]) - 1

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._offsets is None:
            self._offsets = np.load(self.offsets_path, mmap_mode='r')
            size = int(self._offsets[-1])
            # np.memmap refuses empty files; an empty list needs no blob view.
            self._blob = np.memmap(self.blob_path, dtype=np.uint8, mode='r') if size else np.zeros(0, np.uint8)
        return self._offsets, self._blob

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f'index {index} out of range for {self._len} entries of {self.source}')
        offsets, blob = self._open()
        start, end = int(offsets[index]), int(offsets[index + 1])
        return json.loads(blob[start:end].tobytes())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state['_offsets'] = state['_blob'] = None
        return state

    def nbytes_resident_index(self) -> int:
        """Bytes of the offsets table (the only per-entry cost besides the shared blob)."""
        return int(self._open()[0].nbytes)


class ConcatIndex(Sequence):
    """Several annotation indexes read as one sequence (the original concatenates its lists)."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.cumulative = []
        total = 0
        for part in self.parts:
            total += len(part)
            self.cumulative.append(total)

    def __len__(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def locate(self, index: int) -> tuple[int, int]:
        """``(part number, index within part)`` of a global index."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} entries')
        part = bisect.bisect_right(self.cumulative, index)
        return part, index - (self.cumulative[part - 1] if part else 0)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        part, local = self.locate(index)
        return self.parts[part][local]
