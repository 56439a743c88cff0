"""Pretraining pairs streamed from webdataset tar shards (img2dataset's layout), mixed with JSON lists, split over
ranks and loader workers, and resumable at the exact sample.

Layout read (img2dataset ``--output_format webdataset``): each shard ``NNNNN.tar`` holds per sample ``KEY.jpg``
(or ``.jpeg`` / ``.png`` / ``.webp``), ``KEY.txt`` (the caption) and optionally ``KEY.json``; ``NNNNN_stats.json``
beside it gives the number of samples (``successes``). Without it the shard is counted once (its keys read)
and the count cached in ``count_cache_dir``. Tar members are read with the ``webdataset`` library (its tar
iterator, key grouping and ``pipe:`` / URL opener); the planning around it is here because webdataset's own
pipeline (``split_by_node`` / ``split_by_worker`` / ``shuffle``) has no epoch length that every rank shares,
and its sample buffer cannot be fast-forwarded to a resume point.

How an epoch is laid out (all of it a function of (seed, epoch, the shard counts, ranks, workers, batch)):

1. Every source is a list of *shards* with a sample count: tar shards, and JSON lists cut into virtual shards of
   ``json_shard_size`` entries, so a list mixes into the same epoch as the web shards.
2. The shards are permuted with (seed, epoch) and their samples laid end to end. The epoch has
   ``steps = total // (world_size * batch_size)`` steps per rank; rank r takes the r-th run of
   ``steps * batch_size`` positions (at most ``world_size * batch_size - 1`` positions are left for the epoch).
3. Within a rank, step k comes from loader worker ``k % num_workers`` (the DataLoader's round-robin), so worker w
   takes a contiguous run of ``ceil((steps - w) / num_workers) * batch_size`` positions: ranks and workers never
   overlap and together cover every position they take.
4. A worker reads its run in order and emits it through a seeded shuffle buffer (``shuffle_buffer`` samples).
   The emitted order depends on positions only, not on contents, so a resumed worker recomputes it and
   continues after the last sample it emitted, re-reading only the shards its buffer still held.
5. Each sample's augmentation is seeded by (seed, epoch, sample id): the same pair gets the same crop whatever
   rank or worker reads it, and a resumed run continues with the same random draws.

Dirty samples (undecodable or missing image, missing / empty / overlong caption, tiny or huge image) are skipped
and counted per kind (:data:`DIRTY_KINDS`); a worker whose run ends short of its quota because of them repeats its
own first pairs (counted as ``repeated``), so every rank has the same number of steps.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.loading import SharedInts, lenient_decoding, seeded_augmentation
from data.utils import pre_caption

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
# skipped (the pair is not trained on)
SKIP_KINDS = ('no_image', 'undecodable', 'too_small', 'too_large', 'no_caption', 'empty_caption', 'long_caption',
              'missing_in_shard')
# converted to RGB and trained on, counted so that a data set full of them is noticed
CONVERTED_KINDS = ('cmyk', 'palette', 'high_bit_depth', 'alpha', 'grey')
DIRTY_KINDS = SKIP_KINDS + CONVERTED_KINDS


class DirtySample(Exception):
    """A sample that is skipped; ``kind`` is one of :data:`SKIP_KINDS`."""

    def __init__(self, kind: str, detail: str = ''):
        super().__init__(f'{kind}: {detail}')
        self.kind = kind


@dataclass(frozen=True)
class DirtLimits:
    """What a trainable pair is: images with a shorter side below ``min_side`` or more than ``max_pixels`` pixels
    (read from the header, never decoded), captions longer than ``max_caption_chars`` characters are skipped."""
    min_side: int = 8
    max_pixels: int = 89_478_485   # PIL's decompression-bomb limit
    max_caption_chars: int = 2000


# ------------------------------------------------------------------------------------------------ shards

@dataclass(frozen=True)
class Shard:
    """A run of ``count`` samples: a tar shard (``url``), or entries ``[start, start + count)`` of JSON list
    ``part`` of the dataset's annotation index (``url`` is then the list's path, for messages)."""
    url: str
    count: int
    part: int = -1      # -1: a tar shard
    start: int = 0

    @property
    def is_tar(self) -> bool:
        return self.part < 0

    def name(self) -> str:
        return self.url if self.is_tar else f'{self.url}[{self.start}:{self.start + self.count}]'


def expand_shard_urls(patterns: Sequence[str] | str) -> list[str]:
    """Brace-expand ``patterns`` (``/data/cc12m/{00000..01242}.tar``, ``pipe:curl -s URL/{0..9}.tar``); a local
    path that is not there is an error naming it and its pattern."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    urls = []
    for pattern in patterns:
        for url in braceexpand(str(pattern)):
            if not is_stream_url(url) and not os.path.isfile(url):
                raise FileNotFoundError(f'train_shards: no such shard file {url!r} (from {pattern!r})')
            urls.append(url)
    if patterns and not urls:
        raise ValueError(f'train_shards {patterns!r} names no shard')
    return urls


def is_stream_url(url: str) -> bool:
    return url.startswith(('pipe:', 'http://', 'https://', 's3://', 'gs://'))


def stats_path(url: str) -> Optional[Path]:
    """img2dataset's ``NNNNN_stats.json`` beside a local ``NNNNN.tar``."""
    if is_stream_url(url):
        return None
    path = Path(url.removeprefix('file:'))
    return path.with_name(path.name.removesuffix('.tar') + '_stats.json')


def iter_tar_samples(url: str) -> Iterator[dict]:
    """The samples of a tar shard in order, as webdataset groups them (``{'__key__', 'jpg', 'txt', ...}``,
    values as bytes)."""
    from webdataset import tariterators

    yield from tariterators.group_by_keys(tariterators.tar_file_expander(tariterators.url_opener([{'url': url}])))


def count_tar_samples(url: str) -> int:
    return sum(1 for _ in iter_tar_samples(url))


def _count_cache_file(url: str, cache_dir: Path) -> Path:
    ident = url
    if not is_stream_url(url):
        st = os.stat(url)
        ident = f'{os.path.abspath(url)}:{st.st_size}:{st.st_mtime_ns}'
    return cache_dir / f'{hashlib.sha1(ident.encode()).hexdigest()[:20]}.count'


def shard_count(url: str, cache_dir: Optional[str | Path] = None) -> int:
    """Number of samples in a tar shard: img2dataset's ``successes`` from ``NNNNN_stats.json``, else counted once
    (reading the shard) and cached in ``cache_dir`` (default ``~/.cache/blip/shard_counts``)."""
    stats = stats_path(url)
    if stats is not None and stats.is_file():
        try:
            data = json.loads(stats.read_text())
            return int(data['successes'] if 'successes' in data else data['count'])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{stats}: not an img2dataset stats file with a "successes" count ({e})') from None
    cache = Path(cache_dir or Path.home() / '.cache' / 'blip' / 'shard_counts')
    cached = _count_cache_file(url, cache)
    if cached.is_file():
        return int(cached.read_text())
    n = count_tar_samples(url)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f'{cached.name}.{os.getpid()}.tmp')
    tmp.write_text(str(n))
    os.replace(tmp, cached)
    return n


def json_shards(parts: Sequence, shard_size: int) -> list[Shard]:
    """JSON lists (the parts of a :class:`data.ann_index.ConcatIndex`) as virtual shards of ``shard_size``."""
    shards = []
    for p, part in enumerate(parts):
        for start in range(0, len(part), shard_size):
            shards.append(Shard(str(part.source), min(shard_size, len(part) - start), p, start))
    return shards


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Segment:
    shard: int   # index into the dataset's shard list
    lo: int      # sample offsets [lo, hi) within the shard
    hi: int


@dataclass
class Stream:
    """What one (rank, logical worker) emits this epoch: ``batches`` batches taken from ``segments``."""
    segments: list[Segment]
    batches: int

    @property
    def length(self) -> int:
        return sum(s.hi - s.lo for s in self.segments)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards).tolist()


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    return total // (world_size * batch_size)


def worker_batches(steps: int, workers: int, logical: int) -> int:
    """Steps k < ``steps`` with ``k % workers == logical`` (the loader's round-robin gives them to that worker)."""
    return max(0, math.ceil((steps - logical) / workers))


def take_segments(order: Sequence[int], counts: Sequence[int], begin: int, length: int) -> list[Segment]:
    """Positions ``[begin, begin + length)`` of the shards laid end to end in ``order``, as segments; positions past
    the end wrap to the start (only when a resumed epoch has fewer samples left than steps)."""
    total = sum(counts[s] for s in order)
    segments: list[Segment] = []
    if total == 0 or length <= 0:
        return segments
    begin %= total
    while length > 0:
        pos = 0
        for s in order:
            n = counts[s]
            if begin < pos + n and n:
                lo = begin - pos
                take = min(n - lo, length)
                segments.append(Segment(s, lo, lo + take))
                length -= take
                begin += take
                if length == 0:
                    break
            pos += n
        begin %= total
    return segments


def plan_streams(order: Sequence[int], counts: Sequence[int], world_size: int, workers: int, batch_size: int,
                 steps: int, first_step: int = 0) -> list[list[Stream]]:
    """``plan[rank][logical_worker]`` for steps ``[first_step, steps)`` over the shards in ``order``.

    Logical worker l serves steps ``first_step + l, first_step + l + workers, ...``; the rank's share of the
    positions is cut into consecutive runs, one per logical worker."""
    left = steps - first_step
    plan = []
    for rank in range(world_size):
        begin = rank * left * batch_size
        row = []
        for logical in range(workers):
            batches = worker_batches(left, workers, logical)
            row.append(Stream(take_segments(order, counts, begin, batches * batch_size), batches))
            begin += batches * batch_size
        plan.append(row)
    return plan


def emitted_per_shard(stream: Stream, bufsize: int, seed: Sequence[int], cursor: int) -> dict[int, int]:
    """Samples of each shard that a stream had emitted after ``cursor`` emitted positions."""
    order = buffer_order(stream.length, bufsize, seed)[:min(cursor, stream.length)]
    bounds = np.cumsum([s.hi - s.lo for s in stream.segments])
    done: dict[int, int] = {}
    for seg_index, n in zip(*np.unique(np.searchsorted(bounds, order, side='right'), return_counts=True)):
        shard = stream.segments[int(seg_index)].shard
        done[shard] = done.get(shard, 0) + int(n)
    return done


def buffer_order(n: int, bufsize: int, seed: Sequence[int]) -> np.ndarray:
    """The order in which a shuffle buffer of ``bufsize`` emits items 0..n-1 read in order (webdataset's
    algorithm: fill, then emit a random element per element read, then the rest shuffled)."""
    rng = np.random.default_rng(list(seed))
    if bufsize <= 1:
        return np.arange(n)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    k = 0
    picks = rng.random(n)
    for i in range(n):
        buf.append(i)
        if len(buf) >= bufsize:
            j = int(picks[i] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    rest = np.array(buf, dtype=np.int64)
    rng.shuffle(rest)
    out[k:] = rest
    return out


# ------------------------------------------------------------------------------------------ decoding

def to_rgb(image: Image.Image, counts: Optional[dict] = None) -> Image.Image:
    """RGB for every mode web images come in: CMYK (PIL's conversion), palette and alpha images over white
    (transparent pixels were black), 16-bit greyscale scaled to 8 bits (``convert`` clipped it to white)."""
    mode = image.mode

    def seen(kind: str) -> None:
        if counts is not None:
            counts[kind] = counts.get(kind, 0) + 1
    if mode == 'RGB':
        return image
    if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
        seen('high_bit_depth')
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or mode.startswith('I;16') else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)).convert('RGB')
    if mode == 'CMYK':
        seen('cmyk')
        return image.convert('RGB')
    if mode == 'P':
        seen('palette')
        image = image.convert('RGBA')
    elif mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        seen('alpha')
        image = image.convert('RGBA')
    else:
        if mode in ('L', '1'):
            seen('grey')
        return image.convert('RGB')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert('RGB')


DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_checked(source, limits: DirtLimits, load: bool = True) -> Image.Image:
    """Open an image (a path or bytes), refuse tiny and huge ones from the header alone, decode it fully (unless
    ``load`` is False: a transform with ``decodes`` then decodes it, e.g. at a reduced JPEG scale)."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with lenient_decoding():
        try:
            image = Image.open(fp)
        except Exception as e:  # noqa: BLE001 - any decoder failure is one kind of dirt
            raise DirtySample('undecodable', f'{type(e).__name__}: {e}') from None
        w, h = image.size
        if min(w, h) < limits.min_side:
            raise DirtySample('too_small', f'{w}x{h}')
        if w * h > limits.max_pixels:
            raise DirtySample('too_large', f'{w}x{h}')
        if load:
            try:
                image.load()
            except Exception as e:  # noqa: BLE001
                raise DirtySample('undecodable', f'{type(e).__name__}: {e}') from None
    return image


def transform_decoding(transform: Callable, image: Image.Image):
    """``transform(image)`` for an image it decodes itself: decoder failures are dirt, not crashes."""
    with lenient_decoding():
        try:
            return transform(image)
        except DECODE_ERRORS as e:
            raise DirtySample('undecodable', f'{type(e).__name__}: {e}') from None


def check_caption(raw, limits: DirtLimits, max_words: int) -> str:
    if raw is None:
        raise DirtySample('no_caption')
    text = raw.decode('utf-8', errors='replace') if isinstance(raw, (bytes, bytearray)) else str(raw)
    if len(text) > limits.max_caption_chars:
        raise DirtySample('long_caption', f'{len(text)} characters')
    caption = pre_caption(text, max_words)
    if not caption:
        raise DirtySample('empty_caption')
    return caption


def tar_image_bytes(sample: dict) -> Optional[bytes]:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)


# ------------------------------------------------------------------------------------------- the dataset

@dataclass
class BatchInfo:
    """Travels with every batch from a worker: where the worker's stream is (for resume) and what it skipped."""
    logical: int                 # the logical worker that made the batch
    cursor: int                  # emitted positions of its stream so far (repeats counted past the stream length)
    samples: int                 # pairs in the batch (= batch size)
    repeated: int = 0            # pairs of the batch seen before in this epoch (a short stream's padding)
    dirty: dict = field(default_factory=dict)   # kind -> count met while making the batch
    sources: dict = field(default_factory=dict)  # 'shards' / 'lists' -> pairs of the batch
    ids: list = field(default_factory=list)      # sample ids (shard order, offset) of the batch's pairs


class ShardCollate:
    """Collate ``(image, caption, meta)`` samples with ``inner`` on (image, caption) and append a :class:`BatchInfo`."""

    def __init__(self, inner: Optional[Callable] = None):
        self.inner = inner

    def __call__(self, samples: Sequence[tuple]) -> tuple:
        pairs = [(s[0], s[1]) for s in samples]
        batch = self.inner(pairs) if self.inner is not None else tuple(torch.utils.data.default_collate(pairs))
        metas = [s[2] for s in samples]
        info = BatchInfo(metas[-1]['logical'], metas[-1]['cursor'], len(samples),
                         sum(m['repeated'] for m in metas), ids=[m['id'] for m in metas])
        for m in metas:
            for k, v in m['dirty'].items():
                info.dirty[k] = info.dirty.get(k, 0) + v
            info.sources[m['source']] = info.sources.get(m['source'], 0) + 1
        return (*batch, info)


class ShardStream(IterableDataset):
    """Pretraining pairs ``(image, caption, meta)`` from tar shards and JSON lists (see the module docstring).

    Args:
        shards: every shard, in a fixed order (sample ids follow it).
        transform: image transform (PIL -> tensor).
        batch_size, world_size, rank: the loader's batch and the process group's layout.
        seed: data seed (shard order, buffers, augmentation).
        annotation: the ConcatIndex of the JSON lists (for shards with ``part >= 0``).
        image_root: folder relative image paths of the JSON lists are joined to.
        shuffle_buffer: samples in each worker's shuffle buffer.
        limits: what a trainable pair is.
        max_words: caption words kept.
        (a ``transform`` with ``decodes = True`` gets JPEGs undecoded, see :mod:`transform.fast`)
    """

    def __init__(self, shards: Sequence[Shard], transform: Callable, batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, annotation=None, image_root: str = '', shuffle_buffer: int = 1000,
                 limits: DirtLimits = DirtLimits(), max_words: int = 30):
        self.shards = list(shards)
        self.counts = [s.count for s in self.shards]
        self.first_id = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64).tolist()
        self.transform, self.batch_size = transform, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.annotation, self.image_root = annotation, image_root
        self.shuffle_buffer, self.limits, self.max_words = shuffle_buffer, limits, max_words
        self.total = sum(self.counts)
        self.steps = steps_per_epoch(self.total, world_size, batch_size)
        if self.steps == 0:
            raise ValueError(f'{self.total} samples in {len(self.shards)} shards are fewer than one step of '
                             f'{world_size} rank(s) x batch_size {batch_size}')
        self.epoch = 0
        self.saved_state: Optional[dict] = None
        self.first_step = 0
        self.basis: Optional[tuple[list[int], int]] = None   # (shard order, first step) the streams are planned on
        self.cursors: dict[int, int] = {}                     # logical worker -> emitted positions (resume)
        self._shared = SharedInts(2)   # (epoch, first step) as the training process set them, for persistent workers

    # ----------------------------------------------------------------------------------- the runner's hooks
    def __len__(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self._shared[0] = epoch

    def set_resume_state(self, state: Optional[dict]) -> None:
        """The data state saved with a mid-epoch resume point (see :meth:`state`), used by :meth:`start_at_step`."""
        self.saved_state = state

    def state(self, step: int, workers: int, cursors: list[dict]) -> dict:
        """What a resume point at ``step`` needs: the layout, the plan's basis and every rank's worker cursors."""
        order, first = self.epoch_basis()
        return {'epoch': self.epoch, 'step': step, 'world_size': self.world_size, 'workers': workers,
                'batch_size': self.batch_size, 'steps': self.steps, 'order': list(order), 'first': first,
                'cursors': [{str(k): v for k, v in c.items()} for c in cursors]}

    def epoch_basis(self) -> tuple[list[int], int]:
        return self.basis or (epoch_shard_order(len(self.shards), self.seed, self.epoch), 0)

    def start_at_step(self, step: int, workers: int) -> list[str]:
        """Position every worker for step ``step`` of the epoch (called before the loader is iterated); returns
        what is to be said about the resume."""
        self.first_step, self.basis, self.cursors = step, None, {}
        self._shared[1] = step
        if step == 0:
            return []
        state = self.saved_state
        if not state or state.get('epoch') != self.epoch:
            raise ValueError(f'no data state saved for epoch {self.epoch} step {step}: cannot resume the shard stream')
        layout = (state['world_size'], state['workers'], state['batch_size'])
        if layout == (self.world_size, workers, self.batch_size) and state['step'] == step:
            self.basis = (list(state['order']), int(state['first']))
            self.cursors = {int(k): int(v) for k, v in state['cursors'][self.rank].items()}
            return [f'shard stream: epoch {self.epoch} continues at step {step} at the exact sample']
        return self._resume_by_shards(state, step, workers)

    def _resume_by_shards(self, state: dict, step: int, workers: int) -> list[str]:
        """Another layout (ranks, workers or batch): the shards that the saved streams finished are done; the others
        are redone from their start (after the shards not started), spread over this layout's streams for the rest
        of the epoch."""
        order, first = list(state['order']), int(state['first'])
        old = plan_streams(order, self.counts, state['world_size'], state['workers'], state['batch_size'],
                           state['steps'], first)
        seen = dict.fromkeys(range(len(self.shards)), 0)
        for rank, row in enumerate(old):
            cursors = {int(k): int(v) for k, v in state['cursors'][rank].items()}
            for logical, stream in enumerate(row):
                seed = [self.seed, self.epoch, rank, logical, state['world_size'], state['workers'], first]
                for shard, n in emitted_per_shard(stream, self.shuffle_buffer, seed, cursors.get(logical, 0)).items():
                    seen[shard] += n
        finished = {s for s in order if seen[s] >= self.counts[s]}
        partial = [s for s in order if 0 < seen[s] < self.counts[s]]
        # shards not yet started first: when the rest of the epoch has fewer steps than the redone shards have
        # samples (the drop at its end), the pairs left out are ones seen before
        self.basis = ([s for s in order if seen[s] == 0] + partial, step)
        again = sum(seen[s] for s in partial)
        names = ', '.join(self.shards[s].name() for s in partial[:8]) + (', ...' if len(partial) > 8 else '')
        return [f'shard stream: epoch {self.epoch} was saved with {state["world_size"]} rank(s) x {state["workers"]} '
                f'worker(s) x batch {state["batch_size"]} and resumes with {self.world_size} x '
                f'{workers} x {self.batch_size} at shard granularity: {len(finished)} shard(s) done, '
                f'{len(partial)} partly done shard(s) redone from their start ({again} pairs seen again)'
                + (f': {names}' if partial else '')]

    # ----------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None and (self._shared[0], self._shared[1]) != (self.epoch, self.first_step):
            # a persistent worker's copy, made in an earlier epoch: a fresh epoch starts at its first step (a resume
            # plan, set only before the first epoch of a process, was copied into the worker when it started)
            if self._shared[1] != 0:
                raise RuntimeError(f'a persistent loader worker cannot start epoch {self._shared[0]} at step '
                                   f'{self._shared[1]}: only a new loader takes a resume plan')
            self.epoch, self.first_step, self.basis, self.cursors = self._shared[0], 0, None, {}
        order, first = self.epoch_basis()
        # loader worker wid serves steps first_step + wid, + workers, ...: in the plan that is logical worker
        logical = (wid + self.first_step - first) % workers
        plan = plan_streams(order, self.counts, self.world_size, workers, self.batch_size, self.steps, first)
        stream = plan[self.rank][logical]
        done = worker_batches(self.first_step - first, workers, logical)
        seed = [self.seed, self.epoch, self.rank, logical, self.world_size, workers, first]
        yield from self._emit(stream, logical, seed, self.cursors.get(logical, 0),
                              (stream.batches - done) * self.batch_size)

    def _emit(self, stream: Stream, logical: int, seed: list[int], cursor: int, quota: int) -> Iterator[tuple]:
        """``quota`` good pairs of ``stream`` from emitted position ``cursor`` on; past the stream's end it repeats
        its good pairs from the start (a stream shortened by dirty samples), counted as ``repeated``."""
        n = stream.length
        if quota <= 0:
            return
        if n == 0:
            raise ValueError(f'an empty stream was asked for {quota} pairs (epoch {self.epoch})')
        order = buffer_order(n, self.shuffle_buffer, seed)
        reader = _StreamReader(self, stream, order[:cursor] if cursor < n else ())
        dirty: dict[str, int] = {}
        made = good_in_pass = 0
        while made < quota:
            if cursor % n == 0 and cursor > 0:   # a repeat pass reads the stream again
                if good_in_pass == 0 and cursor >= n:
                    names = ', '.join(self.shards[s.shard].name() for s in stream.segments)
                    raise RuntimeError(f'no trainable pair in {names} (skipped: {dirty})')
                reader, good_in_pass = _StreamReader(self, stream, ()), 0
            first_pass = cursor < n
            shard, offset, raw = reader.get(int(order[cursor % n]))
            cursor += 1
            counts: dict[str, int] = {}
            sample_id = self.first_id[shard] + offset
            try:
                image, caption = self._decode(shard, offset, raw, counts)
                with seeded_augmentation(self.seed, self.epoch, sample_id):
                    tensor = transform_decoding(self.transform, image) if getattr(self.transform, 'decodes', False) \
                        else self.transform(image)
            except DirtySample as e:
                if first_pass:
                    dirty[e.kind] = dirty.get(e.kind, 0) + 1
                continue
            if first_pass:
                for k, v in counts.items():
                    dirty[k] = dirty.get(k, 0) + v
            good_in_pass += 1
            made += 1
            meta = {'logical': logical, 'cursor': cursor, 'repeated': int(not first_pass), 'dirty': dirty,
                    'source': 'shards' if self.shards[shard].is_tar else 'lists', 'id': sample_id}
            dirty = {}
            yield tensor, caption, meta

    def _decode(self, shard: int, offset: int, raw, counts: dict) -> tuple[Image.Image, str]:
        spec = self.shards[shard]
        if raw is None:
            raise DirtySample('missing_in_shard', f'{spec.name()} sample {offset}')
        if spec.is_tar:
            caption = check_caption(raw.get('txt'), self.limits, self.max_words)
            data = tar_image_bytes(raw)
            if data is None:
                raise DirtySample('no_image', f'{spec.name()} {raw.get("__key__")}')
        else:
            caption = check_caption(raw.get('caption'), self.limits, self.max_words)
            path = raw.get('image') or raw.get('url') or ''
            if path.startswith(('http://', 'https://')):
                raise DirtySample('no_image', f'{path} is a remote URL')
            path = os.path.join(self.image_root, path.removeprefix('file://')) if self.image_root else path
            try:
                with open(path, 'rb') as f:
                    data = f.read()
            except OSError as e:
                raise DirtySample('no_image', f'{path}: {e}') from None
        if getattr(self.transform, 'decodes', False):   # the transform decodes JPEGs at a reduced scale itself
            image = open_checked(data, self.limits, load=False)
            if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
                if image.mode == 'L':
                    counts['grey'] = counts.get('grey', 0) + 1
                return image, caption
            with lenient_decoding():
                try:
                    image.load()
                except Exception as e:  # noqa: BLE001
                    raise DirtySample('undecodable', f'{type(e).__name__}: {e}') from None
        else:
            image = open_checked(data, self.limits)
        return to_rgb(image, counts), caption


class _StreamReader:
    """Access in emission order to a stream's samples: tar shards are read forward once, keeping the samples still
    to be emitted (about a shuffle buffer's worth) and dropping those in ``emitted`` (a resumed stream's past);
    JSON entries are looked up directly."""

    def __init__(self, dataset: ShardStream, stream: Stream, emitted: Sequence[int]):
        self.ds, self.stream = dataset, stream
        self.bounds = np.cumsum([0] + [s.hi - s.lo for s in stream.segments]).tolist()
        self.emitted = set(int(i) for i in emitted)
        self.pending: dict[int, object] = {}
        self.read_upto = 0
        self.source = self._tar_samples()

    def _locate(self, i: int) -> tuple[int, int]:
        seg = int(np.searchsorted(self.bounds, i, side='right')) - 1
        return seg, self.stream.segments[seg].lo + i - self.bounds[seg]

    def get(self, i: int) -> tuple[int, int, object]:
        """(shard index, offset in the shard, the raw sample or None when the shard lacks it) of position ``i``."""
        seg_index, offset = self._locate(i)
        seg = self.stream.segments[seg_index]
        spec = self.ds.shards[seg.shard]
        if not spec.is_tar:
            return seg.shard, offset, self.ds.annotation.parts[spec.part][spec.start + offset]
        while i not in self.pending and self.read_upto <= i:
            try:
                pos, sample = next(self.source)
            except StopIteration:
                break
            self.read_upto = pos + 1
            if pos not in self.emitted:
                self.pending[pos] = sample
        return seg.shard, offset, self.pending.pop(i, None)

    def _tar_samples(self) -> Iterator[tuple[int, dict]]:
        """(stream position, sample) of every tar sample of the stream in order, skipping segments done before."""
        first_needed = min((i for i in range(self.stream.length) if i not in self.emitted), default=0)
        for k, seg in enumerate(self.stream.segments):
            if not self.ds.shards[seg.shard].is_tar or self.bounds[k + 1] <= first_needed:
                continue
            url = self.ds.shards[seg.shard].url
            try:
                for offset, sample in enumerate(iter_tar_samples(url)):
                    if offset >= seg.hi:
                        break
                    if offset >= seg.lo:
                        yield self.bounds[k] + offset - seg.lo, sample
            except Exception as e:  # noqa: BLE001 - a broken shard ends early: its other samples count as missing
                warnings.warn(f'shard {url} could not be read to its end ({type(e).__name__}: {e})')


# ------------------------------------------------------------------------------ the main process's side

@dataclass
class ShardProgress:
    """What the batches handed to training so far tell, on one rank: each logical worker's cursor (for a resume
    point) and the epoch's counts (pairs by source, repeats, dirty samples by kind)."""
    first_step: int = 0
    batches: int = 0
    cursors: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def update(self, info: BatchInfo) -> None:
        self.batches += 1
        self.cursors[info.logical] = info.cursor
        self._add('samples', info.samples)
        self._add('repeated', info.repeated)
        for kind, n in info.sources.items():
            self._add(f'samples_{kind}', n)
        for kind, n in info.dirty.items():
            self._add(f'{"skipped" if kind in SKIP_KINDS else "converted"}_{kind}', n)

    def _add(self, key: str, n: int) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n

    @property
    def step(self) -> int:
        return self.first_step + self.batches


def count_keys() -> list[str]:
    """Every count :class:`ShardProgress` can hold, in a fixed order (ranks reduce the same list)."""
    return (['samples', 'samples_shards', 'samples_lists', 'repeated'] + [f'skipped_{k}' for k in SKIP_KINDS]
            + [f'converted_{k}' for k in CONVERTED_KINDS])


def pretrain_stream(config, transform: Callable, seed: int, world_size: int, rank: int) -> ShardStream:
    """The :class:`ShardStream` of a pretraining config: ``train_shards`` (tar shards) and ``train_file`` (JSON
    lists, as virtual shards of ``json_shard_size``) in one epoch."""
    from data.pretrain_dataset import load_annotation_index

    shards = [Shard(url, shard_count(url, config.get('shard_count_cache', '') or None))
              for url in expand_shard_urls(config['train_shards'])]
    annotation = None
    if config.get('train_file'):
        annotation = load_annotation_index(config['train_file'])
        shards += json_shards(annotation.parts, int(config.get('json_shard_size', 1000)))
    limits = DirtLimits(config.get('min_image_side', 8), config.get('max_image_pixels', 89_478_485),
                        config.get('max_caption_chars', 2000))
    return ShardStream(shards, transform, config['batch_size'], world_size, rank, seed, annotation,
                       config.get('image_root', ''), config.get('shuffle_buffer', 1000), limits)
