"""CapFilt over web pairs in JSON annotation lists: shards scored per rank, then merged into one annotation file.

Shards are ``shard_size`` consecutive entries; rank 0 merges them in order, so the output does not depend on the
number of ranks or on interruptions.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from data.loading import join_root
from data.pretrain_dataset import load_annotation_index
from engine.capfilt.config import CapFiltConfig, captions_per_image
from engine.capfilt.folder import (REPORT_FILE, SUMMARY_FILE, check_manifest, fingerprint, shard_path, shard_settings,
                                   wait_for_shards, write_atomic, write_json_atomic)
from engine.capfilt.report import write_html_report
from engine.capfilt.scoring import build_models, image_path, run_shard
from engine.capfilt.selection import PairWriter, ScoreTally, kept_captions, report_indices
from engine.config import ConfigError
from transform import create_transforms

def check_inputs(config: CapFiltConfig, entries: Sequence[dict], source: str) -> None:
    """Before any model work: the human annotation files exist, and the web images can be found (a wrong
    ``image_root`` would otherwise count every image as bad and write an output without web pairs)."""
    for path in config.human_ann_file:  # load_config makes a single path a list
        if not os.path.isfile(path):
            raise ConfigError(f'{source}: human_ann_file {path!r} does not exist')
    probe = [join_root(config.image_root, image_path(e).removeprefix('file://')) for e in entries[:16]]
    if probe and not any(os.path.isfile(p) for p in probe):
        raise ConfigError(f'{source}: none of the first {len(probe)} web images exists (first: {probe[0]!r}); '
                          f'check image_root ({config.image_root!r}) and ann_file')


def merge_shards(output_dir: Path, num_shards: int, entries: Sequence[dict], human: Sequence[dict],
                 config: CapFiltConfig) -> dict:
    """Stream the shards in order into the annotation file (kept web/synthetic pairs, then human pairs).

    Writes ``config.output_file``, the summary and the HTML report; returns the summary. Memory stays
    bounded by one shard plus the report samples.
    """
    tally = ScoreTally(config, extra=('synthetic_duplicates',))
    counts = tally.counts
    bad, samples, seconds, shard_images = [], [], 0.0, 0
    wanted = report_indices(len(entries), config.report_samples)

    def write(f) -> None:
        nonlocal seconds, shard_images
        writer = PairWriter(f, config.output_file.endswith('.jsonl'))
        for shard in range(num_shards):
            with open(shard_path(output_dir, shard), encoding='utf-8') as sf:
                rec = json.load(sf)
            bad.extend(rec['bad'])
            seconds += rec['seconds']
            shard_images += rec['images']
            for r in rec['records']:
                entry = entries[r['i']]
                key = 'image' if 'image' in entry else 'url'
                kept = kept_captions(entry, r, config)
                tally.add(r, kept)
                for c, _ in kept:
                    writer.add(key, entry[key], c)
                if config.keep in ('synthetic', 'both'):  # kept by score, dropped as a repeat of a kept caption
                    counts['synthetic_duplicates'] += sum(s >= config.threshold for _, s in r['s']) \
                        - sum(kind == 'synthetic' for _, kind in kept)
                if r['i'] in wanted:
                    samples.append((entry, r))
        for entry in human:
            writer.add_entry(entry)
            counts['human_pairs'] += 1
        writer.close()

    write_atomic(output_dir / config.output_file, write)
    summary = {
        'images_seen': counts['images'] + len(bad), 'images_processed': counts['images'], 'bad_images': len(bad),
        'bad_image_errors': bad[:100], 'score': config.score, 'threshold': config.threshold, 'keep': config.keep,
        'num_captions': captions_per_image(config),
        # synthetic_duplicates = synthetic_kept - synthetic_pairs_out (with keep both/synthetic)
        **{k: v for k, v in counts.items() if k != 'images'},
        'output_pairs': tally.output_pairs(),
        'output_file': str(output_dir / config.output_file),
        **tally.histograms(),
        'images_per_s_per_process': shard_images / seconds if seconds > 0 else None,
    }
    write_html_report(output_dir / REPORT_FILE, samples, config)
    return summary


def run_over_json_list(config: CapFiltConfig, args, rank: int, world: int, device: torch.device, amp_dtype,
                       output_dir: Path, start: float) -> dict:
    """``ann_file``: this rank's shards of the web entries captioned and scored, then (rank 0) all merged into
    ``output_file`` with the summary and the report; returns the summary (``{}`` on other ranks)."""
    entries = load_annotation_index(config.ann_file)
    check_inputs(config, entries, args.config)
    num_shards = (len(entries) + config.shard_size - 1) // config.shard_size
    missing_at_start = [s for s in range(num_shards) if not shard_path(output_dir, s).exists()]
    check_manifest(output_dir, {'fingerprint': fingerprint(config, args.seed),
                                'web_fingerprint': fingerprint(config, args.seed, web_only=True),
                                'entries': len(entries), 'shard_size': config.shard_size, 'num_shards': num_shards,
                                'settings': shard_settings(config, args.seed)},
                   web_merge_only=config.keep == 'web' and not missing_at_start)
    todo = [s for s in missing_at_start if s % world == rank]
    print(f'[rank {rank}/{world}] {len(entries)} web entries in {num_shards} shards; '
          f'{num_shards - len(missing_at_start)} done, {len(todo)} to do here', flush=True)
    if todo:
        captioner, filter_model = build_models(config, device)
        _, transform = create_transforms(config.image_size)
        done = 0
        log_file = output_dir / f'capfilt_log_rank{rank}.jsonl'  # one per rank: no process group, no shared appends
        for k, shard in enumerate(tqdm(todo, desc='capfilt shards', disable=rank != 0, dynamic_ncols=True)):
            lo, hi = shard * config.shard_size, min(len(entries), (shard + 1) * config.shard_size)
            record = run_shard(shard, list(range(lo, hi)), entries, captioner, filter_model, transform, config,
                               args.seed, device, amp_dtype)
            write_json_atomic(shard_path(output_dir, shard), record)
            done += hi - lo
            line = {'rank': rank, 'shard': shard, 'shards_done_here': k + 1, 'shards_here': len(todo),
                    'images': hi - lo, 'bad_images': len(record['bad']),
                    'images_per_s': round(done / (time.time() - start), 2), 'time': round(time.time() - start, 1)}
            with open(log_file, 'a') as f:
                f.write(json.dumps(line) + '\n')
            if rank != 0:
                print(json.dumps(line), flush=True)
    if rank != 0:
        return {}
    wait_for_shards(output_dir, num_shards, config.shard_wait_timeout_s)
    human = load_annotation_index(config.human_ann_file) if config.human_ann_file else []
    summary = merge_shards(output_dir, num_shards, entries, human, config)
    new_images = sum(min(len(entries), (s + 1) * config.shard_size) - s * config.shard_size for s in missing_at_start)
    wall = time.time() - start
    summary.update(world_size=world, wall_seconds=wall, images_this_run=new_images,
                   images_per_s=new_images / wall if new_images else None)
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}), flush=True)
    return summary
