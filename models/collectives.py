"""The collectives the models call inside their forward: all-gather over ranks, with and without gradient.

Plain ``torch.distributed``; every function is the identity without a process group, so a model runs in one
process unchanged. They live here, not in ``engine``, because models must not depend on the engine; the
engine re-exports them (``engine.distributed``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ['is_initialized', 'get_rank', 'get_world_size', 'all_gather_no_grad', 'all_gather_with_grad']


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank on dim 0, without gradient (the original ``concat_all_gather``)."""
    if get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank on dim 0, keeping the gradient path to this rank's part."""
    if get_world_size() == 1:
        return t
    return torch.cat(_GatherLayer.apply(t), dim=0)
