"""CapFilt over web pairs in webdataset tar shards: one input shard per unit of work and of resume, the kept pairs
written as new tar shards.

Per input shard ``s`` (done by rank ``s % world_size``, sampling seeded by ``seed + s``): every sample is decoded
(dirty ones, as :mod:`data.shards` defines them, are counted and listed, never fatal), captioned and scored in
batches; then ``web_shards/NNNNN.tar`` is written with the kept captions (key ``KEY_j`` for the j-th kept caption of
image ``KEY``, the image bytes copied, ``KEY_j.json`` saying web or synthetic and the score) and
``NNNNN_stats.json`` beside it (img2dataset's ``successes`` count, and the threshold / keep it was written with);
the score record ``shards/shard_NNNNNN.json`` comes last and marks the shard done. A changed threshold or keep
re-merges from the records (no model work): rank 0 rewrites the output shards written with other settings.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.pretrain_dataset import load_annotation_index
from data.shards import (DirtLimits, DirtySample, check_caption, expand_shard_urls, iter_tar_samples, open_checked,
                         tar_image_bytes, to_rgb)
from data.utils import pre_caption
from engine.atomic import atomic_write
from engine.capfilt.config import CapFiltConfig, captions_per_image
from engine.capfilt.folder import (REPORT_FILE, SUMMARY_FILE, check_manifest, fingerprint, shard_path,
                                   wait_for_shards, write_atomic, write_json_atomic)
from engine.capfilt.report import thumbnail, write_html_report
from engine.capfilt.scoring import build_models, process_batch
from engine.capfilt.selection import PairWriter, ScoreTally, kept_captions
from engine.config import ConfigError
from transform import create_transforms

OUTPUT_SHARDS = 'web_shards'


def output_shard(output_dir: Path, shard: int) -> Path:
    return output_dir / OUTPUT_SHARDS / f'{shard:05d}.tar'


def output_pattern(output_dir: Path, num_shards: int) -> str:
    return f'{output_dir / OUTPUT_SHARDS}/{{00000..{num_shards - 1:05d}}}.tar'


def score_tar_shard(shard: int, url: str, captioner, filter_model, transform, config, seed: int, device,
                    amp_dtype, thumbnails: int) -> dict:
    """Caption and score the samples of one input shard; returns its record (as capfilt's JSON shards, with the
    sample key ``k`` and web caption ``c`` in each entry, and ``thumbnails`` of its first images for the report)."""
    begin = time.time()
    torch.manual_seed(seed + shard)   # sampling depends on the shard only, not on the rank or on resumes
    limits = DirtLimits()
    records, bad, thumbs, batch = [], [], {}, []
    images = 0

    def flush() -> None:
        if not batch:
            return
        stacked = torch.stack([t for _, _, t, _ in batch]).to(device, non_blocking=True)
        web = [pre_caption(c, config.max_words) for _, _, _, c in batch]
        results = process_batch(captioner, filter_model, stacked, web, config, amp_dtype)
        records.extend({'i': i, 'k': k, 'c': c, **r} for (i, k, _, c), r in zip(batch, results))
        batch.clear()

    for offset, sample in enumerate(iter_tar_samples(url)):
        images += 1
        key = sample['__key__']
        try:
            check_caption(sample.get('txt'), limits, config.max_words)
            data = tar_image_bytes(sample)
            if data is None:
                raise DirtySample('no_image')
            image = to_rgb(open_checked(data, limits))
        except DirtySample as e:
            bad.append({'index': offset, 'key': key, 'error': f'{url} {key}: {e}'})
            continue
        caption = sample['txt'].decode('utf-8', errors='replace')
        if len(thumbs) < thumbnails:
            thumbs[str(offset)] = thumbnail(image)
        batch.append((offset, key, transform(image), caption))
        if len(batch) == config.batch_size:
            flush()
    flush()
    return {'shard': shard, 'url': url, 'records': records, 'bad': bad, 'images': images,
            'seconds': time.time() - begin, 'thumbnails': thumbs}


def settings(config) -> dict:
    return {'threshold': config.threshold, 'keep': config.keep, 'score': config.score, 'max_words': config.max_words}


def write_output_shard(path: Path, record: dict, config) -> int:
    """The kept pairs of one input shard as a tar shard (+ ``_stats.json``); returns the number of pairs."""
    import webdataset as wds

    kept = {r['i']: r for r in record['records']}
    count = 0
    with atomic_write(path) as f:
        writer = wds.TarWriter(f, mtime=0, encoder=False)
        for offset, sample in enumerate(iter_tar_samples(record['url'])):
            r = kept.get(offset)
            if r is None:
                continue
            ext = next(e for e in ('jpg', 'jpeg', 'png', 'webp') if sample.get(e) is not None)
            scores = dict([(r['c'], r['w'])] + [(c, s) for c, s in r['s']])
            for j, (caption, kind) in enumerate(kept_captions({'caption': r['c']}, r, config)):
                meta = {'key': r['k'], 'kind': kind, 'score': scores.get(caption)}
                writer.write({'__key__': f"{r['k']}_{j}", ext: sample[ext], 'txt': caption.encode(),
                              'json': json.dumps(meta).encode()})
                count += 1
        writer.close()
    write_json_atomic(path.with_name(path.name.removesuffix('.tar') + '_stats.json'),
                              {'count': count, 'successes': count, **settings(config)})
    return count


def output_is_current(path: Path, config) -> bool:
    stats = path.with_name(path.name.removesuffix('.tar') + '_stats.json')
    if not (path.is_file() and stats.is_file()):
        return False
    found = json.loads(stats.read_text())
    return {k: found.get(k) for k in settings(config)} == settings(config)


def run_over_tar_shards(config, args, rank: int, world: int, device, amp_dtype, output_dir: Path,
                        start: float) -> dict:
    urls = expand_shard_urls(config.ann_shards)
    for path in config.human_ann_file:
        if not os.path.isfile(path):
            raise ConfigError(f'{args.config}: human_ann_file {path!r} does not exist')
    n = len(urls)
    missing_at_start = [s for s in range(n) if not shard_path(output_dir, s).exists()]
    check_manifest(output_dir, {'fingerprint': fingerprint(config, args.seed),
                                        'web_fingerprint': fingerprint(config, args.seed, web_only=True),
                                        'inputs': urls, 'num_shards': n},
                           web_merge_only=config.keep == 'web' and not missing_at_start)
    todo = [s for s in missing_at_start if s % world == rank]
    print(f'[rank {rank}/{world}] {n} input tar shards; {n - len(missing_at_start)} done, {len(todo)} to do here',
          flush=True)
    per_shard_thumbs = -(-config.report_samples // max(n, 1))
    if todo:
        captioner, filter_model = build_models(config, device)
        _, transform = create_transforms(config.image_size)
        log_file = output_dir / f'capfilt_log_rank{rank}.jsonl'
        for k, shard in enumerate(tqdm(todo, desc='capfilt shards', disable=rank != 0, dynamic_ncols=True)):
            record = score_tar_shard(shard, urls[shard], captioner, filter_model, transform, config, args.seed,
                                     device, amp_dtype, per_shard_thumbs)
            pairs = write_output_shard(output_shard(output_dir, shard), record, config)
            write_json_atomic(shard_path(output_dir, shard), record)   # last: the shard is done
            line = {'rank': rank, 'shard': shard, 'url': urls[shard], 'shards_done_here': k + 1,
                    'shards_here': len(todo), 'images': record['images'], 'bad_images': len(record['bad']),
                    'pairs_out': pairs, 'time': round(time.time() - start, 1)}
            with open(log_file, 'a') as f:
                f.write(json.dumps(line) + '\n')
    if rank != 0:
        return {}
    wait_for_shards(output_dir, n, config.shard_wait_timeout_s)
    summary = merge_tar_records(output_dir, n, config)
    wall = time.time() - start
    summary.update(world_size=world, wall_seconds=wall)
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}), flush=True)
    return summary


def merge_tar_records(output_dir: Path, num_shards: int, config) -> dict:
    """Counts, histograms and the report from the records; output shards written with other settings are
    rewritten; the human pairs go to ``output_file``."""
    tally = ScoreTally(config)
    counts = tally.counts
    bad, samples, seconds, images, rewritten = [], [], 0.0, 0, 0
    for shard in range(num_shards):
        rec = json.loads(shard_path(output_dir, shard).read_text())
        bad += rec['bad']
        seconds += rec['seconds']
        images += rec['images']
        if not output_is_current(output_shard(output_dir, shard), config):
            write_output_shard(output_shard(output_dir, shard), rec, config)
            rewritten += 1
        for r in rec['records']:
            tally.add(r, kept_captions({'caption': r['c']}, r, config))
            thumb = rec.get('thumbnails', {}).get(str(r['i']))
            if thumb and len(samples) < config.report_samples:
                samples.append(({'image': f"{rec['url']} {r['k']}", 'caption': r['c'], 'thumbnail': thumb}, r))

    def write_human(f) -> None:
        writer = PairWriter(f, config.output_file.endswith('.jsonl'))
        for entry in (load_annotation_index(config.human_ann_file) if config.human_ann_file else []):
            writer.add_entry(entry)
            counts['human_pairs'] += 1
        writer.close()

    write_atomic(output_dir / config.output_file, write_human)
    write_html_report(output_dir / REPORT_FILE, samples, config)
    return {
        'images_seen': images, 'images_processed': counts['images'], 'bad_images': len(bad),
        'bad_image_errors': bad[:100], 'score': config.score, 'threshold': config.threshold, 'keep': config.keep,
        'num_captions': captions_per_image(config), **{k: counts[k] for k in counts},
        'output_pairs': tally.output_pairs(),
        'output_shards_rewritten': rewritten,
        'train_shards': output_pattern(output_dir, num_shards), 'train_file': str(output_dir / config.output_file),
        'output_file': str(output_dir / config.output_file),
        **tally.histograms(),
        'images_per_s_per_process': images / seconds if seconds > 0 else None,
    }


def main_over_tar_shards(config: CapFiltConfig, args, rank: int, world: int, device, amp_dtype, output_dir: Path,
                         start: float) -> dict:
    """``ann_shards``: the run over webdataset tar shards (``run_over_tar_shards``)."""
    return run_over_tar_shards(config, args, rank, world, device, amp_dtype, output_dir, start)
