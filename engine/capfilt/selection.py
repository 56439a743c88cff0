"""What CapFilt keeps: per image the captions at or above the threshold in the keep mode, and its accounts.

The merge's counts and score histograms (``ScoreTally``) and the writer of the kept pairs (``PairWriter``).
"""
from __future__ import annotations

import json
import math

from data.utils import pre_caption
from engine.capfilt.config import CapFiltConfig

HIST_BINS = 10


def kept_captions(entry: dict, record: dict, config: CapFiltConfig) -> list[tuple[str, str]]:
    """``(caption, 'web' | 'synthetic')`` kept for one image; the web caption as written, duplicates dropped."""
    captions = []
    if config.keep in ('web', 'both') and record['w'] >= config.threshold:
        captions.append((entry['caption'], 'web'))
    if config.keep in ('synthetic', 'both'):
        captions += [(c, 'synthetic') for c, s in record['s'] if s >= config.threshold]
    seen, unique = set(), []
    for c, kind in captions:
        norm = pre_caption(c, config.max_words)
        if norm not in seen:
            seen.add(norm)
            unique.append((c, kind))
    return unique


class Histogram:
    """Fixed-bin score histogram, filled incrementally."""

    def __init__(self, lo: float, hi: float, bins: int = HIST_BINS):
        self.lo, self.hi, self.counts = lo, hi, [0] * bins
        self.non_finite = 0  # NaN scores (possible under fp16): below every threshold, so removed; counted apart

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            self.non_finite += 1
            return
        b = int((value - self.lo) / (self.hi - self.lo) * len(self.counts))
        self.counts[min(max(b, 0), len(self.counts) - 1)] += 1

    def to_dict(self) -> dict:
        n = len(self.counts)
        return {'edges': [round(self.lo + (self.hi - self.lo) * i / n, 6) for i in range(n + 1)], 'counts': self.counts,
                'non_finite': self.non_finite}


class ScoreTally:
    """A merge's counts and score histograms: images, web and synthetic captions kept / removed by the threshold,
    pairs written per kind. ``counts`` is in the summary's key order (``extra`` keys before ``human_pairs``)."""

    def __init__(self, config: CapFiltConfig, extra: tuple[str, ...] = ()):
        lo, hi = (0.0, 1.0) if config.score == 'itm' else (-1.0, 1.0)
        self.config = config
        self.hist = {name: Histogram(lo, hi) for name in ('web', 'synthetic')}
        self.counts = dict.fromkeys(('images', 'web_kept', 'web_removed', 'synthetic_kept', 'synthetic_removed',
                                     'web_pairs_out', 'synthetic_pairs_out', *extra, 'human_pairs'), 0)

    def add(self, record: dict, kept: list[tuple[str, str]]) -> None:
        """One image's score record and the ``kept_captions`` of it."""
        counts, threshold = self.counts, self.config.threshold
        counts['images'] += 1
        counts['web_kept' if record['w'] >= threshold else 'web_removed'] += 1
        self.hist['web'].add(record['w'])
        # a keep='web' re-merge of shards made with captions does not read them, nor counts them
        for _, s in (record['s'] if self.config.keep != 'web' else ()):
            counts['synthetic_kept' if s >= threshold else 'synthetic_removed'] += 1
            self.hist['synthetic'].add(s)
        for _, kind in kept:
            counts[f'{kind}_pairs_out'] += 1

    def output_pairs(self) -> int:
        return self.counts['web_pairs_out'] + self.counts['synthetic_pairs_out'] + self.counts['human_pairs']

    def histograms(self) -> dict:
        return {'web_score_histogram': self.hist['web'].to_dict(),
                'synthetic_score_histogram': self.hist['synthetic'].to_dict()}


class PairWriter:
    """Streams pretraining pairs into a JSON list (``.json``) or JSON lines (``.jsonl``)."""

    def __init__(self, f, jsonl: bool):
        self.f, self.jsonl, self.count = f, jsonl, 0
        if not jsonl:
            f.write('[')

    def add(self, key: str, path: str, caption: str) -> None:
        text = json.dumps({key: path, 'caption': caption}, ensure_ascii=False)
        if self.jsonl:
            self.f.write(text + '\n')
        else:
            self.f.write(('\n' if self.count == 0 else ',\n') + text)
        self.count += 1

    def add_entry(self, entry: dict) -> None:
        """An annotation entry as it is (a human pair): its ``image`` (or ``url``) and ``caption``."""
        key = 'image' if 'image' in entry else 'url'
        self.add(key, entry[key], entry['caption'])

    def close(self) -> None:
        if not self.jsonl:
            self.f.write('\n]\n')


def report_indices(num_entries: int, samples: int) -> set[int]:
    """Evenly spread image indices for the HTML report (deterministic)."""
    if samples <= 0 or num_entries == 0:
        return set()
    step = max(1, num_entries // samples)
    return set(range(0, num_entries, step)[:samples])
