"""BLIP's loss functions as pure functions (paper section 3.2); models call these, they hold no state.

All losses are computed in fp32 whatever the autocast dtype: softmaxes over a 30k vocabulary or a
57k queue lose too much in bf16.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = 'mean',
            label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing (reference 3.4).

    Args:
        logits: [B, L, V] decoder outputs; position t predicts token t+1.
        labels: [B, L] token ids, -100 where no loss is wanted (padding, prompt, first token).
        reduction: 'mean' over every non-ignored token of the batch, or 'none': per-token losses
            summed per sequence, [B] (VQA answer ranking uses these smoothed "log-likelihoods").
    """
    if reduction not in ('mean', 'none'):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                           reduction=reduction, label_smoothing=label_smoothing, ignore_index=-100)
    if reduction == 'none':
        loss = loss.view(targets.shape).sum(1)
    return loss


def capturing() -> bool:
    """True while a CUDA graph is being recorded on the current stream: shapes must not depend on values."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def lm_loss_at_targets(hidden: torch.Tensor, labels: torch.Tensor, head, reduction: str = 'mean',
                       label_smoothing: float = 0.1, static_shapes: Optional[bool] = None) -> torch.Tensor:
    """``lm_loss(head(hidden), labels)`` with the vocabulary head applied only where a target exists.

    Padding, prompt and the last position never reach the [*, V] projection, which dominates the
    decoder's cost (V = 30524); the value equals ``lm_loss`` on full logits.

    Selecting the target positions needs their count on the host (a device sync, and a shape that changes
    per batch), which a CUDA graph cannot record. ``static_shapes`` (default: while capturing a graph)
    applies the head at every position instead, masking the loss: the same value, no sync.
    """
    if reduction not in ('mean', 'none'):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    targets = labels[:, 1:]
    valid = targets != -100
    if capturing() if static_shapes is None else static_shapes:
        per_token = F.cross_entropy(head(hidden[:, :-1]).float().flatten(0, 1), targets.flatten(),
                                    reduction='none', label_smoothing=label_smoothing, ignore_index=-100)
        per_token = per_token.view(targets.shape)
        if reduction == 'mean':
            return per_token.sum() / valid.sum()
        return per_token.sum(1)
    logits = head(hidden[:, :-1][valid]).float()                                   # [N_valid, V]
    per_token = F.cross_entropy(logits, targets[valid], reduction='none', label_smoothing=label_smoothing)
    if reduction == 'mean':
        return per_token.sum() / valid.sum()  # 0/0 = nan with no target at all, as cross_entropy's mean
    rows = valid.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)


# ---------------------------------------------------------------------------------------------- ITC

def soft_targets(sim_m: torch.Tensor, hard: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum-distilled ITC targets ``alpha * softmax(sim_m) + (1 - alpha) * hard`` (paper 3.2, ALBEF).

    Args:
        sim_m: [B, C] similarities of the momentum encoders (already divided by the temperature).
        hard: [B, C] ground-truth distribution (rows sum to 1: identity, or id-aware positives).
        alpha: distillation weight in [0, 1].
    """
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard.float()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss: soft-target cross-entropy averaged over both directions.

    ``loss_d = -mean_b sum_j log_softmax(sim_d)[b, j] * targets_d[b, j]``; returns ``(i2t + t2i) / 2``.

    Args:
        sim_i2t: [B, C] image-to-text logits (similarity / temperature); sim_t2i likewise.
        targets_i2t, targets_t2i: [B, C] target distributions.
    """
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets_i2t.float()).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i.float()).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


# ---------------------------------------------------------------------------------------------- ITM

def itm_negative_weights(sim: torch.Tensor, positive: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Hard-negative sampling weights ``softmax(sim) + eps`` with positives set to 0 (reference 5.4 step 6, 5.5).

    Pretraining uses ``eps=1e-4`` and the diagonal as ``positive``; retrieval uses ``eps=0`` and
    "same image id" as ``positive``. A row may end up all zero (every candidate is a positive).

    Args:
        sim: [R, C] similarities (already divided by the temperature).
        positive: [R, C] bool, True where the candidate must never be drawn.
    """
    weights = F.softmax(sim.float(), dim=1) + eps
    return weights.masked_fill(positive, 0.0)


def sample_negatives(weights: torch.Tensor, generator: Optional[torch.Generator] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative per row, ``P(j) proportional to weights[r, j]``, for all rows at once.

    A row whose weights are all zero has no valid negative (e.g. every sample of the batch shows the
    same image); ``torch.multinomial`` would raise there (the original's crash, quirk 10.4.9). Such a
    row draws uniformly from all candidates instead and is flagged invalid: the models give its
    negative pair the label -100 so that ``itm_loss`` ignores it.

    Returns:
        (indices [R] int64, valid [R] bool)
    """
    weights = weights.float()
    valid = weights.sum(1) > 0
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    # torch.multinomial(weights, 1)'s own algorithm (argmax of w / q, q ~ Exp(1): the same draws from the same
    # generator), without its input checks: some torch versions read those back to the host, which stalls
    # the launch queue and cannot be recorded in a CUDA graph (the rows here are valid by construction)
    q = torch.empty_like(weights).exponential_(1, generator=generator)
    return (weights / q).argmax(1), valid


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching cross-entropy (class 1 = match), mean over rows whose label is not -100.

    Args:
        logits: [R, 2] ``itm_head`` outputs. labels: [R] int64 in {0, 1, -100}.
    """
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)
