"""Image-text and text-video retrieval evaluation: the original ITC top-k + ITM re-rank protocol, computed fast.

Public API: ``evaluation_retrieval`` / ``itm_eval`` (image-text, reference 8.5), ``evaluation_retrieval_video`` /
``itm_eval_video`` (zero-shot text-video, reference 8.9), and the gallery feature hooks.

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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import distributed as du
from engine.precision import autocast as _autocast

__all__ = ['evaluation_retrieval', 'itm_eval', 'evaluation_retrieval_video', 'itm_eval_video',
           'image_gallery_features', 'video_gallery_features']

TEXT_MAX_LENGTH = 35   # tokens per caption in the retrieval protocol (original)
FILL = -100.0          # score of a pair that is not among a query's top-k candidates (original)

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
