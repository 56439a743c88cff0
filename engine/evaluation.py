"""Evaluation helpers shared by the task scripts: result files, COCO caption metrics, image/video retrieval
(ITC top-k + ITM re-rank, the original protocol, computed fast) and VQA accuracy.

Public API (called by train_caption.py, eval_nocaps.py, train_retrieval.py, eval_retrieval_video.py,
train_vqa.py):

  * ``save_result``            per-rank JSON files merged (and de-duplicated) by rank 0 (reference 7.5);
  * ``coco_caption_eval``      Bleu_1-4, METEOR, ROUGE_L, CIDEr, SPICE with pycocoevalcap; SPICE is optional
                               (its CoreNLP models are downloaded on first use, impossible offline);
  * ``evaluation_retrieval``   / ``itm_eval``              image-text retrieval (reference 8.5);
  * ``evaluation_retrieval_video`` / ``itm_eval_video``    zero-shot text-video retrieval (reference 8.9);
  * ``vqa_accuracy``           the standard 10-annotator VQA accuracy, computed locally.

Retrieval scores are the original's: ``score[i, t] = itm_logit(i, t) + sim(i, t)`` for the top-``k_test``
candidates of each query (texts per image for i2t, images per text for t2i), -100 elsewhere. Layouts as
the original: ``score_i2t`` is ``[N_img, N_txt]`` and ``score_t2i`` is ``[N_txt, N_img]``.

What differs from the original is only how those numbers are computed (same values up to float rounding):
  * ITM(i, t) does not depend on the direction, so the union of the i2t and t2i candidate pairs is scored
    once instead of twice;
  * pairs are grouped by image: an image's cross-attention keys/values are projected once
    (``precompute_cross_kv``) and shared by all of its candidate texts instead of repeating the image
    tokens k times; the texts go in length-sorted chunks trimmed to the chunk's longest text (padding
    positions are masked out, so trimming them changes nothing);
  * work is split over ranks by image (``i % world == rank``) and every score entry is owned by exactly
    one rank, so the all-reduce sum reproduces the one-process matrices exactly (the original summed
    -100-filled matrices, shifting the fill by the world size).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.atomic import atomic_write
from engine import distributed as du
from engine.precision import autocast as _autocast

__all__ = ['save_result', 'coco_caption_eval', 'CAPTION_SCORERS', 'OPTIONAL_CAPTION_METRICS',
           'evaluation_retrieval', 'itm_eval', 'evaluation_retrieval_video', 'itm_eval_video',
           'image_gallery_features', 'video_gallery_features', 'normalize_vqa_answer', 'vqa_accuracy']

TEXT_MAX_LENGTH = 35   # tokens per caption in the retrieval protocol (original)
FILL = -100.0          # score of a pair that is not among a query's top-k candidates (original)


# ================================================================================================ result files

def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename: a reader never sees half a file."""
    with atomic_write(path, binary=False) as f:
        json.dump(obj, f)


def _drop_duplicates(entries: list, key: str) -> list:
    """Keep the first entry of every ``key`` value: distributed samplers pad shards with repeated items."""
    seen, kept = set(), []
    for n, entry in enumerate(entries):
        if key not in entry:
            raise KeyError(f'save_result: entry {n} has no key {key!r} to de-duplicate on: {entry!r}')
        value = entry[key]
        if value not in seen:
            seen.add(value)
            kept.append(entry)
    return kept


def save_result(result: list, result_dir: Union[str, os.PathLike], filename: str, remove_duplicate: str = '') -> str:
    """Merge every rank's results into ``{result_dir}/{filename}.json`` and return that path (on every rank).

    Each rank writes ``{filename}_rank{r}.json``; after a barrier rank 0 concatenates them in rank order,
    keeps the first entry per ``remove_duplicate`` key when one is given, and writes the merged file
    atomically. A second barrier makes the merged file readable by every rank on return.
    """
    folder = Path(result_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(folder / f'{filename}_rank{du.get_rank()}.json', list(result))
    du.barrier()
    final = folder / f'{filename}.json'
    if du.is_main_process():
        merged: list = []
        for r in range(du.get_world_size()):
            with open(folder / f'{filename}_rank{r}.json') as f:
                merged.extend(json.load(f))
        if remove_duplicate:
            merged = _drop_duplicates(merged, remove_duplicate)
        _write_json_atomic(final, merged)
        print(f'result file saved to {final}')
    du.barrier()
    return str(final)


# ================================================================================================ captions

def _bleu():
    from pycocoevalcap.bleu.bleu import Bleu
    return Bleu(4)


def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def _rouge():
    from pycocoevalcap.rouge.rouge import Rouge
    return Rouge()


def _cider():
    from pycocoevalcap.cider.cider import Cider
    return Cider()


def _spice():
    from pycocoevalcap.spice.spice import Spice
    # the constructor downloads Stanford CoreNLP (~400 MB) when missing: bound the wait on a dead network
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return Spice()
    finally:
        socket.setdefaulttimeout(previous)


# (factory, metric names it returns). Module-level so tests (or users without SPICE) can replace entries.
CAPTION_SCORERS: list[tuple[Callable[[], Any], tuple[str, ...]]] = [
    (_bleu, ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4')),
    (_meteor, ('METEOR',)),
    (_rouge, ('ROUGE_L',)),
    (_cider, ('CIDEr',)),
    (_spice, ('SPICE',)),
]
# Metrics reported as None (with a warning) when their scorer fails, instead of failing the evaluation.
OPTIONAL_CAPTION_METRICS = frozenset({'SPICE'})
# Optional scorers that failed in this process, and why: not retried (SPICE's CoreNLP download was attempted and
# warned about 8 times per run), warned about once.
_FAILED_OPTIONAL: dict[tuple, str] = {}  # (factory, names) -> why


@contextlib.contextmanager
def _quiet_stdout():
    """pycocotools and the scorers print progress ('loading annotations into memory...', 'creating index...',
    Bleu's lengths, SPICE's download notice): ~40 lines per evaluation, kept out of the run's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _require_java() -> None:
    """PTBTokenizer, METEOR and SPICE are Java programs: fail early with the fix rather than deep inside."""
    if shutil.which('java') is None:
        raise RuntimeError('coco_caption_eval needs Java on PATH (pycocoevalcap runs the Stanford PTB tokenizer '
                           'and METEOR as Java programs): install a JRE, e.g. `apt-get install -y '
                           'default-jre-headless`')


def _load_caption_pairs(gt_file: str, results_file: str) -> tuple[dict, dict]:
    """GT and result captions per image id, restricted to the images present in the results."""
    from pycocotools.coco import COCO
    with open(results_file) as f:
        results = json.load(f)
    if not results:
        raise ValueError(f'coco_caption_eval: {results_file} holds no captions')
    with _quiet_stdout():
        coco = COCO(gt_file)
    missing = sorted({r['image_id'] for r in results} - set(coco.getImgIds()))
    if missing:
        raise ValueError(f'coco_caption_eval: image ids {missing[:10]} of {results_file} are not in {gt_file}')
    with _quiet_stdout():
        coco_res = coco.loadRes(results_file)
    img_ids = coco_res.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in img_ids}
    res = {i: coco_res.imgToAnns[i] for i in img_ids}
    return gts, res


def _run_scorer(factory: Callable[[], Any], names: Sequence[str], gts: dict, res: dict) -> dict:
    """One scorer's corpus-level metrics as plain floats."""
    with _quiet_stdout():
        scorer = factory()
        score, _ = scorer.compute_score(gts, res)
    values = score if len(names) > 1 else [score]
    return {name: float(v) for name, v in zip(names, values)}


def coco_caption_eval(gt_file: str, results_file: str,
                      scorers: Optional[Sequence[tuple[Callable[[], Any], Sequence[str]]]] = None) -> dict:
    """COCO caption metrics of ``results_file`` (``[{"image_id", "caption"}]``) against a COCO-format GT file.

    Only the images present in the results are scored. Every scorer runs on its own (rather than through
    ``COCOEvalCap``) so that an optional metric (SPICE, which needs a CoreNLP download on first use) that
    fails is reported as None with a warning while the other metrics are still returned.

    Args:
        scorers: ``[(factory, metric names)]``; default ``CAPTION_SCORERS``.

    Returns:
        ``{'Bleu_1'..'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'}`` -> float (or None for a failed optional one).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    _require_java()
    gts, res = _load_caption_pairs(gt_file, results_file)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    metrics: dict = {}
    for factory, names in (CAPTION_SCORERS if scorers is None else scorers):
        names = tuple(names)
        optional = set(names) <= OPTIONAL_CAPTION_METRICS
        if optional and (factory, names) in _FAILED_OPTIONAL:  # failed before in this run: not tried (nor warned) again
            metrics.update({name: None for name in names})
            continue
        try:
            metrics.update(_run_scorer(factory, names, gts, res))
        except Exception as e:  # noqa: BLE001 - any failure of an optional metric is reported, not fatal
            if not optional:
                raise
            _FAILED_OPTIONAL[factory, names] = f'{type(e).__name__}: {e}'
            warnings.warn(f'{"/".join(names)} unavailable ({type(e).__name__}: {e}); reported as None for the '
                          f'rest of this run', RuntimeWarning, stacklevel=2)
            metrics.update({name: None for name in names})
    for name, value in metrics.items():
        print(f'{name}: {"n/a" if value is None else f"{value:.3f}"}')
    return metrics


# ================================================================================================ retrieval

GalleryHook = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _attention_backends(device: torch.device):
    """On CUDA, flash / memory-efficient SDPA: every image brings a new row count, and cuDNN attention (the
    default pick on H100) builds an execution plan per new shape (~0.1 s each, measured by the benchmark)."""
    if device.type != 'cuda':
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def image_gallery_features(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] -> (ITC feature [B, D] fp32 unit norm, ITM memory = ViT tokens [B, N, W])."""
    embeds = model.visual_encoder(image)
    feat = F.normalize(model.vision_proj(embeds[:, 0]).float(), dim=-1)
    return feat, embeds


def video_gallery_features(model, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos [B, F, 3, H, W] -> (normalize(mean over frames of vision_proj(frame CLS)) [B, D],
    ITM memory = every frame's tokens concatenated [B, F*N, W]) (reference 8.9)."""
    B, n_frames = video.shape[:2]
    embeds = model.visual_encoder(video.flatten(0, 1))                                   # [B*F, N, W]
    proj = model.vision_proj(embeds[:, 0]).float().view(B, n_frames, -1).mean(1)
    return F.normalize(proj, dim=-1), embeds.reshape(B, n_frames * embeds.shape[1], embeds.shape[2])


@dataclass
class _Texts:
    ids: torch.Tensor       # [N_txt, 35] with [ENC] at position 0 (ITM input)
    mask: torch.Tensor      # [N_txt, 35]
    lengths: torch.Tensor   # [N_txt] valid tokens
    feat: torch.Tensor      # [N_txt, D] fp32 unit norm


@dataclass
class _Gallery:
    feat: torch.Tensor                # [N, D] fp32 unit norm, every item
    memory: torch.Tensor              # [N_owned, T, W] ITM memory of this rank's items (CPU)
    local: dict                       # gallery index -> row of ``memory``


def _encode_texts(model, tokenizer, texts: Sequence[str], device: torch.device, chunk: int,
                  amp_dtype: Optional[torch.dtype]) -> _Texts:
    """Unimodal text features ([CLS] first, ``mode='text'``) and the ITM input ids ([ENC] first)."""
    ids, masks, feats = [], [], []
    for s in range(0, len(texts), chunk):
        tok = tokenizer(list(texts[s:s + chunk]), padding='max_length', truncation=True, max_length=TEXT_MAX_LENGTH,
                        return_tensors='pt').to(device)
        with _autocast(device, amp_dtype):
            out = model.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, mode='text')
            feats.append(F.normalize(model.text_proj(out.last_hidden_state[:, 0]).float(), dim=-1))
        ids.append(tok.input_ids)
        masks.append(tok.attention_mask)
    ids_all, mask_all = torch.cat(ids), torch.cat(masks)
    ids_all[:, 0] = tokenizer.enc_token_id
    return _Texts(ids_all, mask_all, mask_all.sum(1), torch.cat(feats))


def _encode_gallery(model, loader: Iterable, device: torch.device, hook: GalleryHook,
                    amp_dtype: Optional[torch.dtype], rank: int, world: int) -> _Gallery:
    """Every item's ITC feature (all ranks need all of them for the top-k) and the ITM memory of this rank's
    items only (kept on the CPU, as the original: COCO-5k ViT tokens are ~9 GB in fp32)."""
    feats, memories, owned = [], [], []
    offset = 0
    for batch in loader:
        x = batch[0].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            feat, memory = hook(model, x)
        index = torch.arange(offset, offset + x.shape[0])
        keep = index % world == rank
        feats.append(feat)
        memories.append(memory[keep.to(memory.device)].cpu())
        owned += index[keep].tolist()
        offset += x.shape[0]
    return _Gallery(torch.cat(feats), torch.cat(memories), {g: n for n, g in enumerate(owned)})


def _candidate_pairs(sims: torch.Tensor, k: int, rank: int, world: int) -> torch.Tensor:
    """Pair ids ``i * N_txt + t`` of the union of i2t (top-k texts per image) and t2i (top-k images per text)
    candidates whose image this rank owns, sorted (hence grouped by image)."""
    n_img, n_txt = sims.shape
    i2t = sims.topk(min(k, n_txt), dim=1).indices                                      # [I, k]
    t2i = sims.topk(min(k, n_img), dim=0).indices                                      # [k, T]
    pairs_i2t = torch.arange(n_img, device=sims.device)[:, None] * n_txt + i2t
    pairs_t2i = t2i * n_txt + torch.arange(n_txt, device=sims.device)[None, :]
    pairs = torch.unique(torch.cat([pairs_i2t.flatten(), pairs_t2i.flatten()]))
    return pairs[(pairs // n_txt) % world == rank]


def _itm_logits(model, ids: torch.Tensor, mask: torch.Tensor, cross_kv: list) -> torch.Tensor:
    """Raw ITM 'match' logit (not softmax, as the original) of text rows sharing one image's cross K/V."""
    out = model.text_encoder(ids, attention_mask=mask, cross_kv=cross_kv, mode='multimodal')
    return model.itm_head(out.last_hidden_state[:, 0])[:, 1].float()


def _image_pair_scores(model, memory: torch.Tensor, texts: _Texts, txt: torch.Tensor, device: torch.device,
                       chunk: int) -> torch.Tensor:
    """ITM logits of one image against its candidate texts ``txt``: K/V once, length-sorted trimmed chunks."""
    cross_kv = model.text_encoder.precompute_cross_kv(memory.unsqueeze(0).to(device, non_blocking=True))
    order = texts.lengths[txt].argsort(stable=True)
    rows_sorted = txt[order]
    lengths = texts.lengths[rows_sorted].tolist()       # one host read per image (chunk shapes)
    scores = torch.empty(len(txt), device=device)
    for s in range(0, len(txt), chunk):
        rows = rows_sorted[s:s + chunk]
        L = int(lengths[min(s + chunk, len(txt)) - 1])   # ascending: the chunk's last row is its longest
        scores[s:s + chunk] = _itm_logits(model, texts.ids[rows, :L], texts.mask[rows, :L], cross_kv)
    out = torch.empty_like(scores)
    out[order] = scores
    return out


def _grouped_pair_scores(model, gallery: _Gallery, texts: _Texts, pairs: torch.Tensor, n_txt: int,
                         device: torch.device, chunk: int, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """ITM logit of every (owned) candidate pair, image by image."""
    img_of, txt_of = pairs // n_txt, pairs % n_txt
    scores = torch.empty(len(pairs), device=device)
    images, counts = torch.unique_consecutive(img_of, return_counts=True)
    start = 0
    with _attention_backends(device), _autocast(device, amp_dtype):
        for i, c in zip(images.tolist(), counts.tolist()):
            sl = slice(start, start + c)
            scores[sl] = _image_pair_scores(model, gallery.memory[gallery.local[i]], texts, txt_of[sl], device,
                                            chunk)
            start += c
    return scores


def _score_matrices(sims: torch.Tensor, pairs: torch.Tensor, pair_scores: torch.Tensor, k: int, rank: int,
                    world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of both matrices: its images' rows (i2t) / columns (t2i) hold the original's values
    (ITM + sim for candidates, -100 elsewhere), other entries 0 so that the sum over ranks is exact."""
    n_img, n_txt = sims.shape
    own = torch.arange(n_img, device=sims.device) % world == rank
    itm = torch.full((n_img, n_txt), float('nan'), device=sims.device)
    itm.view(-1)[pairs] = pair_scores
    s_i2t = torch.zeros_like(sims)
    s_i2t[own] = FILL
    s_t2i = torch.zeros(n_txt, n_img, device=sims.device)
    s_t2i[:, own] = FILL
    rows = own.nonzero().squeeze(1)
    cols = sims[rows].topk(min(k, n_txt), dim=1).indices                               # [I_own, k]
    r = rows[:, None].expand_as(cols)
    s_i2t[r, cols] = itm[r, cols] + sims[r, cols]
    top_img = sims.topk(min(k, n_img), dim=0).indices                                  # [k, T]
    t = torch.arange(n_txt, device=sims.device)[None, :].expand_as(top_img)
    mine = own[top_img]
    i_sel, t_sel = top_img[mine], t[mine]
    s_t2i[t_sel, i_sel] = itm[i_sel, t_sel] + sims[i_sel, t_sel]
    if torch.isnan(s_i2t).any() or torch.isnan(s_t2i).any():
        raise RuntimeError('internal error: a top-k candidate pair was not scored')
    return s_i2t, s_t2i


def _sum_over_ranks(*tensors: torch.Tensor) -> None:
    """In-place all-reduce (sum) when a process group runs."""
    if du.is_dist_avail_and_initialized() and du.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


@torch.no_grad()
def _rerank(model, loader, tokenizer, device, k_test: int, amp_dtype, text_chunk: int, itm_chunk: int,
            hook: GalleryHook) -> tuple[np.ndarray, np.ndarray]:
    """The ITC top-k + ITM re-rank protocol for any gallery (images or videos), given its feature hook."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        rank, world = du.get_rank(), du.get_world_size()
        texts = _encode_texts(model, tokenizer, loader.dataset.text, device, text_chunk, amp_dtype)
        gallery = _encode_gallery(model, loader, device, hook, amp_dtype, rank, world)
        sims = gallery.feat @ texts.feat.T                                             # [N_img, N_txt], fp32
        pairs = _candidate_pairs(sims, k_test, rank, world)
        pair_scores = _grouped_pair_scores(model, gallery, texts, pairs, sims.shape[1], device, itm_chunk,
                                           amp_dtype)
        s_i2t, s_t2i = _score_matrices(sims, pairs, pair_scores, k_test, rank, world)
        _sum_over_ranks(s_i2t, s_t2i)
        return s_i2t.cpu().numpy(), s_t2i.cpu().numpy()
    finally:
        model.train(was_training)


def evaluation_retrieval(model, loader, tokenizer, device, k_test: int, amp_dtype: Optional[torch.dtype] = None,
                         text_chunk: int = 256, *, itm_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Image-text retrieval scores of the original protocol (reference 8.5).

    Args:
        loader: yields ``(image [B, 3, H, W], image index)`` in gallery order; ``loader.dataset.text`` lists
            the captions. Every rank iterates the whole loader (no distributed sampler).
        k_test: candidates re-ranked by ITM per query.
        amp_dtype: autocast dtype (None = fp32, as the original).
        text_chunk: captions per unimodal text-encoder forward (256, as the original).
        itm_chunk: candidate texts of one image per ITM forward.

    Returns:
        ``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` float32 arrays, identical on every rank.
    """
    return _rerank(model, loader, tokenizer, device, k_test, amp_dtype, text_chunk, itm_chunk,
                   image_gallery_features)


def evaluation_retrieval_video(model, loader, tokenizer, device, k_test: int,
                               amp_dtype: Optional[torch.dtype] = None, text_chunk: int = 256, *,
                               itm_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Text-video retrieval scores (reference 8.9): as ``evaluation_retrieval`` with videos
    ``[B, F, 3, H, W]`` as the gallery (``(video, video_id)`` batches).

    Returns:
        ``(score_v2t [N_vid, N_txt], score_t2v [N_txt, N_vid])``.
    """
    return _rerank(model, loader, tokenizer, device, k_test, amp_dtype, text_chunk, itm_chunk,
                   video_gallery_features)


def _descending_positions(scores: np.ndarray) -> np.ndarray:
    """``pos[q, c]`` = position of candidate c in query q's ranking, with the original's tie order
    (``np.argsort(score)[::-1]``)."""
    order = np.argsort(scores, axis=1)[:, ::-1]
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1)
    return pos


def _best_ranks(scores: np.ndarray, targets: Callable[[int], Iterable[int]]) -> np.ndarray:
    """Per query, the best (lowest) ranking position among its ground-truth candidates."""
    pos = _descending_positions(np.asarray(scores))
    return np.array([min(pos[q, c] for c in targets(q)) for q in range(pos.shape[0])], dtype=np.float64)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else [x]


def _recalls(ranks: np.ndarray, prefix: str) -> dict:
    out = {f'{prefix}_r{K}': float(100.0 * np.mean(ranks < K)) for K in (1, 5, 10)}
    out[f'{prefix}_r_mean'] = (out[f'{prefix}_r1'] + out[f'{prefix}_r5'] + out[f'{prefix}_r10']) / 3
    return out


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Mapping, img2txt: Mapping) -> dict:
    """Recall@1/5/10 (percent) both ways, as the original: an image's rank is the best among its captions.

    Args:
        scores_i2t: [N_img, N_txt]; scores_t2i: [N_txt, N_img] (as ``evaluation_retrieval`` returns them).
        txt2img: caption index -> image index; img2txt: image index -> caption indices.
    """
    txt_ranks = _best_ranks(scores_i2t, lambda i: _as_list(img2txt[i]))
    img_ranks = _best_ranks(scores_t2i, lambda t: _as_list(txt2img[t]))
    out = {**_recalls(txt_ranks, 'txt'), **_recalls(img_ranks, 'img')}
    out['r_mean'] = (out['txt_r_mean'] + out['img_r_mean']) / 2
    return out


def itm_eval_video(score_v2t: np.ndarray, score_t2v: np.ndarray, txt2vmr: Sequence, vmr2txt: Sequence) -> dict:
    """Video retrieval metrics (reference 8.9): ``txt_r*`` video->text, ``vid_r*`` text->video (the paper's
    direction), ``vid_mdR`` = median rank (1-based) of text->video, means and ``r_mean``.

    Args:
        score_v2t: [N_vid, N_txt]; score_t2v: [N_txt, N_vid].
        txt2vmr: caption -> video index; vmr2txt: video -> caption index (or indices).
    """
    txt_ranks = _best_ranks(score_v2t, lambda v: _as_list(vmr2txt[v]))
    vid_ranks = _best_ranks(score_t2v, lambda t: _as_list(txt2vmr[t]))
    out = {**_recalls(txt_ranks, 'txt'), **_recalls(vid_ranks, 'vid')}
    out['vid_mdR'] = float(np.median(vid_ranks + 1))
    out['r_mean'] = (out['txt_r_mean'] + out['vid_r_mean']) / 2
    return out


# ================================================================================================ VQA

# A documented subset of the official VQA answer normalisation (VQA v2 evaluation code's rules).
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = frozenset({'a', 'an', 'the'})
_CONTRACTIONS = {'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldnt': "couldn't", 'didnt': "didn't",
                 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't", 'hasnt': "hasn't", 'havent': "haven't",
                 'hes': "he's", 'im': "i'm", 'isnt': "isn't", 'itd': "it'd", 'itll': "it'll", "let's": "let's",
                 'shouldnt': "shouldn't", 'thats': "that's", 'theres': "there's", 'theyre': "they're",
                 'wasnt': "wasn't", 'werent': "weren't", 'whats': "what's", 'wont': "won't", 'wouldnt': "wouldn't",
                 'youre': "you're", 'youve': "you've"}
_PUNCT = r"""[;/\[\]"{}()=+\\_\-><@`,?!*#%&^|~:]"""
_DIGIT_COMMA = re.compile(r'(?<=\d),(?=\d)')
_PERIOD_NOT_DECIMAL = re.compile(r'(?<!\d)\.|\.(?!\d)')   # keeps decimal points only
_INNER_PUNCT = re.compile(rf'(?<=\w){_PUNCT}(?=\w)')
_ANY_PUNCT = re.compile(_PUNCT)


def normalize_vqa_answer(answer: str) -> str:
    """Lower-case; ``1,000`` -> ``1000``; periods dropped unless decimal points; punctuation inside a word ->
    space (``t-shirt`` -> ``t shirt``), elsewhere removed; number words zero..ten -> digits; articles a/an/the
    dropped; common apostrophe-less contractions restored (``dont`` -> ``don't``); whitespace collapsed.

    Unlike the official script, which normalises only when the annotators disagree, this is always applied
    (to the prediction and to every annotator answer): answers that differ only in these respects match.
    """
    s = answer.replace('\n', ' ').replace('\t', ' ').strip().lower()
    s = _DIGIT_COMMA.sub('', s)
    s = _PERIOD_NOT_DECIMAL.sub('', s)
    s = _INNER_PUNCT.sub(' ', s)
    s = _ANY_PUNCT.sub('', s)
    words = []
    for w in s.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return ' '.join(words)


def _annotator_answers(entry: Mapping) -> list[str]:
    """An annotation's answers: a list of strings, a list of ``{'answer': ...}`` (official format) or one string."""
    raw = entry.get('answer', entry.get('answers'))
    if raw is None:
        raise KeyError(f"VQA annotation of question {entry.get('question_id')!r} has no 'answer'/'answers'")
    raw = [raw] if isinstance(raw, str) else raw
    answers = [a['answer'] if isinstance(a, Mapping) else a for a in raw]
    if not answers:
        raise ValueError(f"VQA annotation of question {entry.get('question_id')!r} has no answers")
    return answers


def _question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of ``min(1, matches / 3)`` (in [0, 1]).

    With a single answer there is no subset to leave one out of: the score is exact match (1 or 0).
    """
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving out a matching annotator removes one match; leaving out another one keeps them all
    per_subset = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(results: list, annotations: list) -> float:
    """Standard VQA accuracy (percent) of ``[{'question_id', 'answer'}]`` against annotations holding
    ``question_id`` and the annotators' ``answer`` list (as data/vqa_dataset.py and data/toy.py write them)."""
    by_id = {a['question_id']: a for a in annotations}
    if not results:
        raise ValueError('vqa_accuracy: no results')
    total = 0.0
    for r in results:
        qid = r['question_id']
        if qid not in by_id:
            raise KeyError(f'vqa_accuracy: question_id {qid!r} of the results is not in the annotations')
        total += _question_accuracy(str(r['answer']), _annotator_answers(by_id[qid]))
    return 100.0 * total / len(results)
