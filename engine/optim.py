"""The original optimizer and learning-rate schedules (reference 8.1), as pure functions of the step."""
from __future__ import annotations

import math

import torch

__all__ = ['cosine_lr', 'warmup_lr', 'step_lr', 'create_optimizer', 'set_lr']


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """Per-epoch cosine: constant within an epoch, the last epoch does not reach ``min_lr``."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def warmup_lr(step: int, max_step: int, init_lr: float, max_lr: float) -> float:
    """Linear warm-up from ``init_lr`` to ``max_lr`` over ``max_step`` steps, then flat."""
    return min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)


def step_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    """Exponential decay per epoch, floored at ``min_lr``."""
    return max(min_lr, init_lr * decay_rate ** epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


def create_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, one group, default betas/eps, as the original.

    The fused CUDA kernel is used when every parameter is on a CUDA device (same math, one launch).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.init_lr, weight_decay=config.get('weight_decay', 0.05), fused=fused or None)
