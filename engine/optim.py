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
    """Every group's learning rate.

    A capturable group (its update replayed in a CUDA graph, ``engine.cuda_graph``) keeps it as a device tensor
    filled in place, which the recorded update reads; a resumed state dict may have put a number there.
    Other groups get a number (a tensor from such a run's checkpoint would fail the foreach kernels).
    """
    for group in optimizer.param_groups:
        if group.get('capturable'):
            if not isinstance(group['lr'], torch.Tensor):
                group['lr'] = torch.tensor(float(lr), dtype=torch.float32, device=group['params'][0].device)
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


def create_optimizer(model: torch.nn.Module, config, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, one group, default betas/eps, as the original.

    The fused CUDA kernel is used when every parameter is on a CUDA device (same math, one launch).
    ``capturable``: fused, with the step count and a tensor learning rate on the parameters' device, so that
    the update can be recorded in a CUDA graph (``engine.cuda_graph``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    weight_decay = config.get('weight_decay', 0.05)
    if capturable:
        lr = torch.tensor(float(config.init_lr), dtype=torch.float32, device=params[0].device)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, capturable=True)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=config.init_lr, weight_decay=weight_decay, fused=fused or None)
