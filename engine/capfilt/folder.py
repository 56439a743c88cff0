"""CapFilt's output folder: file names, per-shard score files and their manifest, atomic writes, the wait for ranks.

The manifest keeps shards of other settings or data from mixing into a run; rank 0 waits for the other ranks'
shard files before it merges them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from engine.atomic import atomic_write_with
from engine.capfilt.config import CapFiltConfig, captions_per_image
from engine.config import ConfigError

SUMMARY_FILE = 'capfilt_summary.json'
REPORT_FILE = 'capfilt_report.html'
# Settings that change the shards' contents; a resumed run must use the same ones.
SHARD_KEYS = ('ann_file', 'image_root', 'captioner', 'filter', 'vit', 'image_size', 'med_config', 'num_captions',
              'sample', 'top_p', 'top_k', 'num_beams', 'repetition_penalty', 'max_length', 'min_length', 'prompt',
              'score', 'itm_first_token', 'max_words', 'shard_size', 'cuda_graph')


# Settings of the synthetic captions only: a keep='web' merge ignores them.
GENERATION_KEYS = ('captioner', 'num_captions', 'sample', 'top_p', 'top_k', 'num_beams', 'repetition_penalty',
                   'max_length', 'min_length', 'prompt', 'cuda_graph')


def shard_settings(config: CapFiltConfig, seed: int, web_only: bool = False) -> dict:
    """Everything that determines the shards (threshold and keep only act at the merge); with ``web_only``,
    what determines their web-caption scores."""
    values = {k: getattr(config, k) for k in SHARD_KEYS if not (web_only and k in GENERATION_KEYS)}
    values['seed'] = seed
    if not web_only:
        values['num_captions'] = captions_per_image(config)
    return json.loads(json.dumps(values, default=str))


def fingerprint(config: CapFiltConfig, seed: int, web_only: bool = False) -> str:
    """Hash of ``shard_settings``."""
    values = shard_settings(config, seed, web_only)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardMismatchError(ConfigError, RuntimeError):
    """The output folder's shards were made with other settings or data."""


def _changes(found: dict, manifest: dict) -> str:
    """'key: old -> new' for every setting (or manifest entry) that differs."""
    old, new = found.get('settings'), manifest.get('settings')
    if old is None or new is None:  # a manifest written before settings were recorded
        old, new = found, manifest
    else:
        old = {**old, **{k: v for k, v in found.items() if k not in ('settings', 'fingerprint', 'web_fingerprint')}}
        new = {**new, **{k: v for k, v in manifest.items() if k not in ('settings', 'fingerprint', 'web_fingerprint')}}
    return ', '.join(f'{k}: {old.get(k, "(unset)")!r} -> {new.get(k, "(unset)")!r}'
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def remove_earlier_capfilt(output_dir: Path, config: CapFiltConfig) -> None:
    """``--overwrite``: the earlier run's shards, merged output, summary and report go before this run starts."""
    old = [*sorted(shard_dir(output_dir).glob('*')), output_dir / config.output_file, output_dir / SUMMARY_FILE,
           output_dir / REPORT_FILE, *sorted(output_dir.glob('capfilt_log_rank*.jsonl'))]
    removed = [p for p in old if p.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        print(f'--overwrite: removed {len(removed)} file(s) of an earlier CapFilt run in {output_dir}')


def shard_dir(output_dir: Path) -> Path:
    return output_dir / 'shards'


def shard_path(output_dir: Path, shard: int) -> Path:
    return shard_dir(output_dir) / f'shard_{shard:06d}.json'


def write_atomic(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary file, fsync, then rename over ``path``."""
    atomic_write_with(path, write, binary=False)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda f: json.dump(obj, f))


def check_manifest(output_dir: Path, manifest: dict, web_merge_only: bool = False) -> None:
    """Record what the shards are made from; refuse to mix shards of another config or data.

    ``web_merge_only``: a keep='web' run over complete shards; shards made with other caption-generation
    settings are fine then (their synthetic captions are not read), as long as their web scores match.
    """
    path = shard_dir(output_dir) / 'manifest.json'
    if path.exists():
        found = json.loads(path.read_text())
        same_scores = {k: v for k, v in found.items() if k not in ('fingerprint', 'settings')} == \
            {k: v for k, v in manifest.items() if k not in ('fingerprint', 'settings')}
        if web_merge_only and same_scores:
            return
        if found != manifest:
            raise ShardMismatchError(f'{path} was written by a run with other data or settings: '
                                     f'{_changes(found, manifest)}; --overwrite starts over there (removing its '
                                     f'shards), or use a new --output_dir')
        return
    write_json_atomic(path, manifest)


def wait_for_shards(output_dir: Path, num_shards: int, timeout_s: float, poll_s: float = 5.0) -> None:
    """Rank 0 waits for the other ranks' shard files (no collective, so no process-group timeout applies).

    A rank that died without taking the job down (srun without --kill-on-bad-exit, or an output_dir that
    is not shared between nodes) would leave rank 0 waiting forever: after ``timeout_s`` without a new
    shard it stops, naming the missing shards; every finished shard stays, and a rerun resumes.
    """
    announced, last_count, last_change = False, -1, time.time()
    while True:
        missing = [s for s in range(num_shards) if not shard_path(output_dir, s).exists()]
        if not missing:
            return
        if len(missing) != last_count:
            last_count, last_change = len(missing), time.time()
        elif time.time() - last_change > timeout_s:
            raise TimeoutError(f'no new shard in {shard_dir(output_dir)} for {timeout_s:.0f} s (shard_wait_timeout_s); '
                               f'{len(missing)} missing, e.g. {missing[:5]}: did a rank stop? Finished shards are '
                               f'kept; run again to do the rest')
        if not announced:
            print(f'waiting for {len(missing)} shard(s) of other ranks, e.g. {missing[:5]}', flush=True)
            announced = True
        time.sleep(poll_s)
