"""BLIP's loss functions as pure functions (paper section 3.2); models call these, they hold no state.

All losses are computed in fp32 whatever the autocast dtype: softmaxes over a 30k vocabulary or a
57k queue lose too much in bf16.
"""
from __future__ import annotations

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
