"""CapFilt: bootstrap a cleaner pretraining set with a captioner and a filter (BLIP paper, section 3.3).

For every web image the captioner (an image-grounded decoder fine-tuned on human captions, e.g.
``model_base_caption_capfilt_large.pth``) samples synthetic captions with nucleus sampling; the filter
(an image-grounded encoder fine-tuned with ITC+ITM, e.g. ``model_base_retrieval_coco.pth``) scores the
web caption and each synthetic one, and every caption whose ITM match probability is below the
threshold is removed (reference 11: captioner = COCO caption model, filter = COCO retrieval model).
Kept pairs plus the human-annotated pairs form the new pretraining set, written in the original
``[{'image', 'caption'}]`` format that ``pretrain.py`` reads with the same ``image_root``.

Work is cut into shards of ``shard_size`` web entries; shard ``s`` is done by rank ``s % world_size``
with the sampling RNG seeded by ``seed + s``, and written atomically (scores, not decisions) when it
completes. A killed run resumes by skipping finished shards; rank 0 waits for every shard and merges
them in order, so the output does not depend on the number of ranks or on interruptions. Because the
shards hold scores, ``threshold`` and ``keep`` can be changed and the output re-merged without
re-running the models. Unreadable images are counted and listed in the summary, never fatal.

Web pairs given as webdataset tar shards (``ann_shards``, img2dataset's layout) are worked on one input shard at
a time (the unit of resume), and the kept pairs are written as new tar shards ``web_shards/NNNNN.tar`` (same
keys, ``KEY_j`` for the j-th kept caption of image KEY, the image bytes copied) that ``pretrain.py`` reads as
``train_shards``; ``output_file`` then holds the human pairs only (``train_file``). See ``run_over_tar_shards`` below.

Outputs in ``--output_dir``: ``output_file`` (the new annotation list), ``capfilt_summary.json``
(counts, score histograms, throughput), ``capfilt_report.html`` (a Figure-4-like page of examples),
``shards/`` (the per-shard scores) and ``config.yaml``.

    torchrun --nproc_per_node=8 capfilt.py --config configs/capfilt.yaml --output_dir output/capfilt
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.loading import join_root
from data.pretrain_dataset import load_annotation_index
from data.shards import (DirtLimits, DirtySample, check_caption, expand_shard_urls, iter_tar_samples, open_checked,
                         tar_image_bytes, to_rgb)
from data.utils import pre_caption
from engine.atomic import atomic_write_with
from engine.config import CommonConfig, ConfigError, UsageError, add_common_args, load_config, save_config
from engine.cuda_graph import decoding_note
from engine.lock import lock_output_dir, release_output_dir
from engine.distributed import read_dist_env
from engine.loop import AMP_DTYPES
from engine.runner import resolve_device
from models.blip import blip_decoder
from models.blip_itm import FIRST_TOKENS, blip_itm
from transform import create_transforms

HIST_BINS = 10
SUMMARY_FILE = 'capfilt_summary.json'
REPORT_FILE = 'capfilt_report.html'
# Settings that change the shards' contents; a resumed run must use the same ones.
SHARD_KEYS = ('ann_file', 'image_root', 'captioner', 'filter', 'vit', 'image_size', 'med_config', 'num_captions',
              'sample', 'top_p', 'top_k', 'num_beams', 'repetition_penalty', 'max_length', 'min_length', 'prompt',
              'score', 'itm_first_token', 'max_words', 'shard_size', 'cuda_graph')


@dataclass
class CapFiltConfig(CommonConfig):
    ann_file: list = field(default_factory=list)        # web pairs: JSON lists or JSON lines
    ann_shards: list = field(default_factory=list)      # or web pairs as webdataset tar shards (brace patterns)
    human_ann_file: list = field(default_factory=list)  # human-annotated pairs, copied to the output
    image_root: str = ''                                 # prefix of relative image paths (both lists)
    captioner: str = ''                                  # checkpoint (path or URL) of a BLIP_Decoder
    filter: str = ''                                     # checkpoint of a BLIP_Retrieval / BLIP_ITM
    vit: object = 'base'
    image_size: int = 384
    num_captions: int = 1            # synthetic captions per image
    sample: bool = True              # nucleus sampling (paper); False = beam search
    top_p: float = 0.9
    top_k: int = 50                  # the original's sampling also had HF's default top-k 50 (reference 5.3)
    num_beams: int = 3               # beam search only (num_captions <= num_beams)
    repetition_penalty: float = 1.0  # beam search only; sampling uses the original's fixed 1.1
    max_length: int = 30
    min_length: int = 5
    prompt: str = 'a picture of '
    cuda_graph: Optional[bool] = None  # replay each decode step as one CUDA graph (empty: on with a GPU; bf16 may
                                       # differ in last bits)
    threshold: float = 0.5           # keep a caption when its score >= threshold
    score: str = 'itm'               # 'itm' (softmax match probability) or 'itc' (cosine similarity)
    itm_first_token: str = 'enc'     # the token ITM was trained with; 'cls' = the original BLIP_ITM demo
    keep: str = 'both'               # 'web', 'synthetic' or 'both'
    batch_size: int = 32
    shard_size: int = 1024
    max_words: int = 30              # captions are cleaned with pre_caption(caption, max_words) as in pretraining
    report_samples: int = 48
    output_file: str = 'capfilt_annotations.json'  # '.jsonl' writes JSON lines
    shard_wait_timeout_s: float = 7200.0  # rank 0 stops waiting for other ranks' shards after this long without one


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


def validate(config: CapFiltConfig, source: str) -> None:
    """Errors naming the key for values the script cannot use."""
    choices = [('score', config.score, ('itm', 'itc')), ('keep', config.keep, ('web', 'synthetic', 'both')),
               ('itm_first_token', config.itm_first_token, FIRST_TOKENS)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f'{source}: {key} must be one of {allowed}, got {value!r}')
    if not config.ann_file and not config.ann_shards:
        raise ConfigError(f'{source}: ann_file (or ann_shards) must name at least one annotation file (shard)')
    if config.ann_file and config.ann_shards:
        raise ConfigError(f'{source}: give the web pairs as ann_file or as ann_shards, not both')
    if not config.filter:
        raise ConfigError(f'{source}: filter must name a retrieval/ITM checkpoint')
    if config.keep != 'web' and not config.captioner:
        raise ConfigError(f"{source}: captioner must name a caption checkpoint (or set keep: 'web')")
    if config.keep != 'web' and config.num_captions < 1:
        raise ConfigError(f'{source}: num_captions must be >= 1, got {config.num_captions}')
    if not config.sample and config.num_captions > config.num_beams:
        raise ConfigError(f'{source}: beam search returns at most num_beams={config.num_beams} captions, '
                          f'num_captions is {config.num_captions}')
    if config.score == 'itm' and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f'{source}: threshold must be in [0, 1] for ITM scores, got {config.threshold}')
    if config.score == 'itc' and not -1.0 <= config.threshold <= 1.0:
        raise ConfigError(f'{source}: threshold must be in [-1, 1] for ITC cosine similarities, got {config.threshold}')
    if config.shard_size < 1 or config.batch_size < 1:
        raise ConfigError(f'{source}: shard_size and batch_size must be >= 1')
    if config.amp not in ('', *AMP_DTYPES):
        raise ConfigError(f"{source}: amp must be one of {sorted(AMP_DTYPES)} or '', got {config.amp!r}")


def captions_per_image(config: CapFiltConfig) -> int:
    """Synthetic captions generated per image (none when only web captions are kept)."""
    return 0 if config.keep == 'web' else config.num_captions


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


# ---------------------------------------------------------------------------------------------- data

def image_path(entry: dict) -> str:
    return entry['image'] if 'image' in entry else entry['url']


class ShardImages(Dataset):
    """The images of one shard: ``(index, image or None, error or None)``; a bad image is not fatal."""

    def __init__(self, entries: Sequence[dict], indices: Sequence[int], image_root: str, transform):
        self.entries, self.indices, self.image_root, self.transform = entries, list(indices), image_root, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path = image_path(self.entries[index])
        try:
            if path.startswith(('http://', 'https://')):
                raise ValueError('remote URL: download the images first and point the entries at local files')
            with Image.open(join_root(self.image_root, path.removeprefix('file://'))) as im:
                image = self.transform(im.convert('RGB'))
            return index, image, None
        except Exception as e:  # any read/decode failure: name the file, keep going
            return index, None, f'{path}: {type(e).__name__}: {e}'


def collate_shard(batch):
    good = [(i, im) for i, im, _ in batch if im is not None]
    bad = [(i, err) for i, _, err in batch if err is not None]
    images = torch.stack([im for _, im in good]) if good else None
    return [i for i, _ in good], images, bad


# ---------------------------------------------------------------------------------------------- models

@torch.no_grad()
def match_scores(filter_model, image_embeds: torch.Tensor, captions: list[str], rows_per_image: int,
                 config: CapFiltConfig) -> torch.Tensor:
    """Score ``rows_per_image`` consecutive captions per image.

    Args:
        image_embeds: [B, N, D] ViT tokens of the filter.
        captions: B * rows_per_image strings, grouped per image.

    Returns:
        [B * rows_per_image] fp32: ITM match probability (softmax[:, 1]) or ITC cosine similarity.
    """
    tok = filter_model.tokenizer
    # max_length 35 as BLIP_ITM / retrieval; padding to the longest caption gives the same scores, faster
    text = tok(captions, padding='longest', truncation=True, max_length=35, return_tensors='pt').to(image_embeds.device)
    if config.score == 'itc':
        text_out = filter_model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        text_feat = F.normalize(filter_model.text_proj(text_out.last_hidden_state[:, 0]).float(), dim=-1)
        image_feat = F.normalize(filter_model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        return (image_feat.repeat_interleave(rows_per_image, 0) * text_feat).sum(-1)
    ids = text.input_ids
    if config.itm_first_token == 'enc':
        ids = ids.clone()
        ids[:, 0] = tok.enc_token_id
    # text row j attends to image j // rows_per_image: each image's cross-attention K/V computed once
    out = filter_model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                    mode='multimodal')
    return filter_model.itm_head(out.last_hidden_state[:, 0]).float().softmax(-1)[:, 1]


@torch.no_grad()
def process_batch(captioner, filter_model, images: torch.Tensor, web_captions: list[str], config: CapFiltConfig,
                  amp_dtype) -> list[dict]:
    """Caption and score one batch.

    Returns:
        Per image ``{'w': web score, 's': [[synthetic caption, score], ...]}``.
    """
    n = captions_per_image(config)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        synthetic = []
        if n:
            synthetic = captioner.generate(images, sample=config.sample, num_beams=config.num_beams,
                                           max_length=config.max_length, min_length=config.min_length,
                                           top_p=config.top_p, top_k=config.top_k,
                                           repetition_penalty=config.repetition_penalty,
                                           num_return_sequences=n, prompt=config.prompt,
                                           cuda_graph=config.cuda_graph)
            synthetic = [pre_caption(c, config.max_words) for c in synthetic]
        candidates = []
        for i, web in enumerate(web_captions):
            candidates += [web] + synthetic[i * n:(i + 1) * n]
        image_embeds = filter_model.visual_encoder(images)
        scores = match_scores(filter_model, image_embeds, candidates, n + 1, config).tolist()
    return [{'w': scores[i * (n + 1)],
             's': [[c, s] for c, s in zip(synthetic[i * n:(i + 1) * n], scores[i * (n + 1) + 1:(i + 1) * (n + 1)])]}
            for i in range(len(web_captions))]


def build_models(config: CapFiltConfig, device: torch.device):
    common = dict(image_size=config.image_size, vit=config.vit, med_config=config.med_config)
    captioner = None
    if captions_per_image(config):
        captioner = blip_decoder(pretrained=config.captioner, prompt=config.prompt, **common).to(device).eval()
    filter_model = blip_itm(pretrained=config.filter, itm_first_token=config.itm_first_token, **common)
    return captioner, filter_model.to(device).eval()


# ---------------------------------------------------------------------------------------------- shards

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


def run_shard(shard: int, indices: list[int], entries, captioner, filter_model, transform, config: CapFiltConfig,
              seed: int, device: torch.device, amp_dtype) -> dict:
    """Caption and score the images of one shard; returns its record (scores, bad images, time)."""
    start = time.time()
    torch.manual_seed(seed + shard)  # sampling depends on the shard only, not on the rank or on resumes
    loader = DataLoader(ShardImages(entries, indices, config.image_root, transform), batch_size=config.batch_size,
                        num_workers=config.num_workers, collate_fn=collate_shard, pin_memory=device.type == 'cuda')
    records, bad = [], []
    for batch_indices, images, batch_bad in loader:
        bad += [{'index': i, 'error': e} for i, e in batch_bad]
        if not batch_indices:
            continue
        web = [pre_caption(entries[i]['caption'], config.max_words) for i in batch_indices]
        results = process_batch(captioner, filter_model, images.to(device, non_blocking=True), web, config, amp_dtype)
        records += [{'i': i, **r} for i, r in zip(batch_indices, results)]
    return {'shard': shard, 'records': records, 'bad': bad, 'images': len(indices), 'seconds': time.time() - start}


# ---------------------------------------------------------------------------------------------- merge

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

    def close(self) -> None:
        if not self.jsonl:
            self.f.write('\n]\n')


def report_indices(num_entries: int, samples: int) -> set[int]:
    """Evenly spread image indices for the HTML report (deterministic)."""
    if samples <= 0 or num_entries == 0:
        return set()
    step = max(1, num_entries // samples)
    return set(range(0, num_entries, step)[:samples])


def merge_shards(output_dir: Path, num_shards: int, entries: Sequence[dict], human: Sequence[dict],
                 config: CapFiltConfig) -> dict:
    """Stream the shards in order into the annotation file (kept web/synthetic pairs, then human pairs).

    Writes ``config.output_file``, the summary and the HTML report; returns the summary. Memory stays
    bounded by one shard plus the report samples.
    """
    lo, hi = (0.0, 1.0) if config.score == 'itm' else (-1.0, 1.0)
    hist = {name: Histogram(lo, hi) for name in ('web', 'synthetic')}
    counts = dict.fromkeys(('images', 'web_kept', 'web_removed', 'synthetic_kept', 'synthetic_removed',
                            'web_pairs_out', 'synthetic_pairs_out', 'synthetic_duplicates', 'human_pairs'), 0)
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
                counts['images'] += 1
                web_ok = r['w'] >= config.threshold
                counts['web_kept' if web_ok else 'web_removed'] += 1
                hist['web'].add(r['w'])
                # a keep='web' re-merge of shards made with captions does not read them, nor counts them
                for _, s in (r['s'] if config.keep != 'web' else ()):
                    counts['synthetic_kept' if s >= config.threshold else 'synthetic_removed'] += 1
                    hist['synthetic'].add(s)
                key = 'image' if 'image' in entry else 'url'
                kept = kept_captions(entry, r, config)
                for c, kind in kept:
                    writer.add(key, entry[key], c)
                    counts[f'{kind}_pairs_out'] += 1
                if config.keep in ('synthetic', 'both'):  # kept by score, dropped as a repeat of a kept caption
                    counts['synthetic_duplicates'] += sum(s >= config.threshold for _, s in r['s']) \
                        - sum(kind == 'synthetic' for _, kind in kept)
                if r['i'] in wanted:
                    samples.append((entry, r))
        for h in range(len(human)):
            entry = human[h]
            key = 'image' if 'image' in entry else 'url'
            writer.add(key, entry[key], entry['caption'])
            counts['human_pairs'] += 1
        writer.close()

    write_atomic(output_dir / config.output_file, write)
    summary = {
        'images_seen': counts['images'] + len(bad), 'images_processed': counts['images'], 'bad_images': len(bad),
        'bad_image_errors': bad[:100], 'score': config.score, 'threshold': config.threshold, 'keep': config.keep,
        'num_captions': captions_per_image(config),
        'web_kept': counts['web_kept'], 'web_removed': counts['web_removed'],
        'synthetic_kept': counts['synthetic_kept'], 'synthetic_removed': counts['synthetic_removed'],
        'web_pairs_out': counts['web_pairs_out'], 'synthetic_pairs_out': counts['synthetic_pairs_out'],
        'synthetic_duplicates': counts['synthetic_duplicates'],  # synthetic_kept - synthetic_pairs_out (with keep both/synthetic)
        'human_pairs': counts['human_pairs'],
        'output_pairs': counts['web_pairs_out'] + counts['synthetic_pairs_out'] + counts['human_pairs'],
        'output_file': str(output_dir / config.output_file),
        'web_score_histogram': hist['web'].to_dict(), 'synthetic_score_histogram': hist['synthetic'].to_dict(),
        'images_per_s_per_process': shard_images / seconds if seconds > 0 else None,
    }
    write_html_report(output_dir / REPORT_FILE, samples, config)
    return summary


# ---------------------------------------------------------------------------------------------- report

def thumbnail_data_uri(path: str, size: int = 160) -> str:
    """The image as an embedded JPEG thumbnail; '' when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            im.thumbnail((size, size))
            if max(im.size) < size // 2:  # toy images are tiny: enlarge for viewing
                scale = size // max(im.size)
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, format='JPEG', quality=85)
        return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')
    except Exception:
        return ''


def caption_line(kind: str, caption: str, score: float, kept: bool) -> str:
    status = 'kept' if kept else 'removed'
    return (f'<li class="{status}"><span class="tag">{kind}, {status}, {score:.3f}</span> '
            f'{html.escape(caption)}</li>')


def write_html_report(path: Path, samples: list[tuple[dict, dict]], config: CapFiltConfig) -> None:
    """A page like the paper's Figure 4: each image with its web caption and synthetic captions."""
    rows = []
    for entry, r in samples:
        src = entry.get('thumbnail') or thumbnail_data_uri(join_root(config.image_root,
                                                                      image_path(entry).removeprefix('file://')))
        img = (f'<img src="{src}" alt="{html.escape(image_path(entry))}">' if src
               else f'<span class="missing">{html.escape(image_path(entry))} (unreadable)</span>')
        # marked as the output has them: score, keep mode and duplicates (kept_captions keeps this order)
        kept, j, lines = kept_captions(entry, r, config), 0, []
        for kind, caption, score in [('web', entry['caption'], r['w'])] + [('synthetic', c, s) for c, s in r['s']]:
            in_output = j < len(kept) and kept[j] == (caption, kind)
            j += in_output
            lines.append(caption_line(kind, caption, score, in_output))
        rows.append(f'<tr><td>{img}</td><td><ul>{"".join(lines)}</ul></td></tr>')
    score_name = 'ITM match probability' if config.score == 'itm' else 'ITC cosine similarity'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>CapFilt report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
td {{ vertical-align: top; padding: 6px; border-bottom: 1px solid #ddd; }}
ul {{ list-style: none; padding-left: 0; margin: 0; }}
.kept {{ color: #1a7f37; }}
.removed {{ color: #b42318; text-decoration: line-through; }}
.tag {{ font-size: 80%; color: #555; text-decoration: none; display: inline-block; min-width: 14em; }}
</style>
</head>
<body>
<h1>CapFilt: captioner and filter</h1>
<p>Score: {html.escape(score_name)}; threshold {config.threshold}; keep: {html.escape(config.keep)};
{len(samples)} sampled images. Green captions are kept, red (struck through) ones removed.</p>
<table>
{chr(10).join(rows)}
</table>
</body>
</html>
"""
    write_atomic(path, lambda f: f.write(page))


# ---------------------------------------------------------------------------------------------- main

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


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, CapFiltConfig, args.options)
    validate(config, args.config)
    env = read_dist_env()
    if env and env['world_size'] > 1 and not args.distributed:
        raise RuntimeError('launched with WORLD_SIZE>1 but --distributed False: drop one or the other')
    rank, world = (env['rank'], env['world_size']) if env else (0, 1)
    device = resolve_device(args.device)
    amp_dtype = AMP_DTYPES[config.amp or ('bf16' if device.type == 'cuda' else 'none')]
    output_dir = Path(args.output_dir)
    if args.resume or args.evaluate:
        raise UsageError(f"capfilt.py: {'--resume' if args.resume else '--evaluate'} does not apply: a rerun "
                         f"continues by itself (finished shards are kept); --overwrite starts over")
    if args.overwrite and world > 1:
        raise UsageError('capfilt.py --overwrite: run it with one process (the ranks share no process group to '
                         'agree on when the old shards are gone), or delete the folder first')
    if rank == 0:
        lock_output_dir(output_dir)  # a second CapFilt in this folder is refused at once
        if args.overwrite:
            remove_earlier_capfilt(output_dir, config)
        save_config(config, output_dir)
        print(decoding_note(config.cuda_graph, device))

    if config.toy_root:
        from data.toy import ensure_toy_dataset  # file-locked: concurrent ranks wait for the first
        ensure_toy_dataset(config.toy_root, exact=False)
    start = time.time()
    if config.ann_shards:
        return main_over_tar_shards(config, args, rank, world, device, amp_dtype, output_dir, start)
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
    release_output_dir(output_dir)
    return summary


# ------------------------------------------------------------------------------------------ over tar shards
# CapFilt over webdataset tar shards: one input shard is one unit of work (and of resume); the kept pairs are written
# as new tar shards that ``pretrain.py`` reads as ``train_shards``.
# 
# Per input shard ``s`` (done by rank ``s % world_size``, sampling seeded by ``seed + s``): every sample is decoded
# (dirty ones, as :mod:`data.shards` defines them, are counted and listed, never fatal), captioned and scored in
# batches; then ``web_shards/NNNNN.tar`` is written with the kept captions (key ``KEY_j`` for the j-th kept caption of
# image ``KEY``, the image bytes copied, ``KEY_j.json`` saying web or synthetic and the score) and
# ``NNNNN_stats.json`` beside it (img2dataset's ``successes`` count, and the threshold / keep it was written with);
# the score record ``shards/shard_NNNNNN.json`` comes last and marks the shard done. A changed threshold or keep
# re-merges from the records (no model work): rank 0 rewrites the output shards written with other settings.

OUTPUT_SHARDS = 'web_shards'


def output_shard(output_dir: Path, shard: int) -> Path:
    return output_dir / OUTPUT_SHARDS / f'{shard:05d}.tar'


def output_pattern(output_dir: Path, num_shards: int) -> str:
    return f'{output_dir / OUTPUT_SHARDS}/{{00000..{num_shards - 1:05d}}}.tar'


def thumbnail(image) -> str:
    import base64
    import io

    im = image.copy()
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.convert('RGB').save(buf, format='JPEG', quality=85)
    return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode('ascii')


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    count = 0
    with open(tmp, 'wb') as f:
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
    os.replace(tmp, path)
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
    lo, hi = (0.0, 1.0) if config.score == 'itm' else (-1.0, 1.0)
    hist = {name: Histogram(lo, hi) for name in ('web', 'synthetic')}
    counts = dict.fromkeys(('images', 'web_kept', 'web_removed', 'synthetic_kept', 'synthetic_removed',
                            'web_pairs_out', 'synthetic_pairs_out', 'human_pairs'), 0)
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
            counts['images'] += 1
            counts['web_kept' if r['w'] >= config.threshold else 'web_removed'] += 1
            hist['web'].add(r['w'])
            for _, s in (r['s'] if config.keep != 'web' else ()):
                counts['synthetic_kept' if s >= config.threshold else 'synthetic_removed'] += 1
                hist['synthetic'].add(s)
            for _, kind in kept_captions({'caption': r['c']}, r, config):
                counts[f'{kind}_pairs_out'] += 1
            thumb = rec.get('thumbnails', {}).get(str(r['i']))
            if thumb and len(samples) < config.report_samples:
                samples.append(({'image': f"{rec['url']} {r['k']}", 'caption': r['c'], 'thumbnail': thumb}, r))

    def write_human(f) -> None:
        writer = PairWriter(f, config.output_file.endswith('.jsonl'))
        for entry in (load_annotation_index(config.human_ann_file) if config.human_ann_file else []):
            key = 'image' if 'image' in entry else 'url'
            writer.add(key, entry[key], entry['caption'])
            counts['human_pairs'] += 1
        writer.close()

    write_atomic(output_dir / config.output_file, write_human)
    write_html_report(output_dir / REPORT_FILE, samples, config)
    return {
        'images_seen': images, 'images_processed': counts['images'], 'bad_images': len(bad),
        'bad_image_errors': bad[:100], 'score': config.score, 'threshold': config.threshold, 'keep': config.keep,
        'num_captions': captions_per_image(config), **{k: counts[k] for k in counts},
        'output_pairs': counts['web_pairs_out'] + counts['synthetic_pairs_out'] + counts['human_pairs'],
        'output_shards_rewritten': rewritten,
        'train_shards': output_pattern(output_dir, num_shards), 'train_file': str(output_dir / config.output_file),
        'output_file': str(output_dir / config.output_file),
        'web_score_histogram': hist['web'].to_dict(), 'synthetic_score_histogram': hist['synthetic'].to_dict(),
        'images_per_s_per_process': images / seconds if seconds > 0 else None,
    }


def main_over_tar_shards(config: CapFiltConfig, args, rank: int, world: int, device, amp_dtype, output_dir: Path,
                         start: float) -> dict:
    """``ann_shards``: the run over webdataset tar shards (``run_over_tar_shards``)."""
    return run_over_tar_shards(config, args, rank, world, device, amp_dtype, output_dir, start)


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
