"""Momentum encoders and feature queues, shared by BLIP_Pretrain and BLIP_Retrieval (ALBEF heritage).

* ``copy_params(pairs)`` / ``momentum_update(pairs, m)``: the momentum twin of each online module
  starts as a copy and then follows ``p_m = m * p_m + (1 - m) * p`` (one foreach op for all tensors).
* ``FeatureQueue``: the queues of momentum features the ITC loss uses as extra negatives. The buffers
  live on the model itself under the original names (``image_queue``, ``text_queue``, ``queue_ptr``
  for pretraining; ``idx_queue``, ``ptr_queue`` for retrieval) so checkpoints keep the original
  layout; ``FeatureQueue`` only knows those names.

Distributed: ``enqueue`` all-gathers the features of every rank (identity without a process group), so
every rank holds the same queue.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.collectives import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size

__all__ = ['ModulePairs', 'PinnedPairs', 'copy_params', 'momentum_update', 'FeatureQueue', 'all_gather_no_grad',
           'all_gather_with_grad', 'get_rank', 'get_world_size']

ModulePairs = Sequence[tuple[nn.Module, nn.Module]]  # (online, momentum)


def _param_lists(pairs: ModulePairs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    online, momentum = [], []
    for model, model_m in pairs:
        named, named_m = dict(model.named_parameters()), dict(model_m.named_parameters())
        if named.keys() != named_m.keys():
            raise ValueError(f'momentum twin of {type(model).__name__} has different parameters: '
                             f'{sorted(named.keys() ^ named_m.keys())[:5]}')
        online += [named[k] for k in named]
        momentum += [named_m[k] for k in named]
    return online, momentum


@torch.no_grad()
def copy_params(pairs: ModulePairs) -> None:
    """Copy every online parameter into its momentum twin and freeze the twin (``requires_grad=False``)."""
    online, momentum = _param_lists(pairs)
    for p, p_m in zip(online, momentum):
        p_m.copy_(p)
        p_m.requires_grad_(False)


class PinnedPairs(list):
    """Module pairs whose parameters were listed once, at rest: the lists ``momentum_update`` then uses.

    Under sharding (FSDP2, ``engine.parallel``), a module's registered parameters are swapped for gathered
    (possibly bf16) copies while a forward runs, so listing ``module.parameters()`` inside the model's forward
    would update copies that are thrown away. The sharded parameters listed at rest are the ones the optimizer
    steps; the update is elementwise, so each rank updates its own shards (``to_local``), with no collective.
    """

    def __init__(self, pairs: ModulePairs):
        super().__init__(pairs)
        self.online, self.momentum = _paired_parameters(self)


def _paired_parameters(pairs: ModulePairs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    online, momentum = [], []
    for model, model_m in pairs:
        params, params_m = list(model.parameters()), list(model_m.parameters())
        if len(params) != len(params_m):
            raise ValueError(f'momentum twin of {type(model).__name__} has {len(params_m)} parameters, '
                             f'the online module {len(params)}')
        online += params
        momentum += params_m
    return online, momentum


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, 'to_local') else t


@torch.no_grad()
def momentum_update(pairs: ModulePairs, m: float) -> None:
    """``p_m = m * p_m + (1 - m) * p`` for every pair, as one foreach multiply and one foreach add.

    Runs every training step on a host-bound GPU step, so the twins are paired by position: their names
    were checked when ``copy_params`` made them twins, and collecting ~400 names per step cost ~2 ms of
    host time at base size (half of it here, ``detach`` views included). A twin that gained or lost a
    parameter since is still an error. ``PinnedPairs`` bring their parameter lists (sharded training).
    """
    if isinstance(pairs, PinnedPairs):
        online, momentum = [_local(p) for p in pairs.online], [_local(p) for p in pairs.momentum]
    else:
        online, momentum = _paired_parameters(pairs)
    torch._foreach_mul_(momentum, m)
    torch._foreach_add_(momentum, online, alpha=1 - m)


class FeatureQueue:
    """Names and logic of one set of ITC queues stored as buffers of ``owner``.

    Args:
        image, text: buffer names of the [embed_dim, queue_size] feature queues.
        ptr: buffer name of the [1] int64 write pointer.
        idx: buffer name of the [1, queue_size] int64 image-id queue (retrieval), or None.
    """

    def __init__(self, image: str = 'image_queue', text: str = 'text_queue', ptr: str = 'queue_ptr',
                 idx: Optional[str] = None):
        self.image, self.text, self.ptr, self.idx = image, text, ptr, idx

    def register(self, owner: nn.Module, embed_dim: int, queue_size: int) -> None:
        """Create the buffers: random unit columns (as the original), ids -100 (never a positive), pointer 0."""
        owner.register_buffer(self.image, F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        owner.register_buffer(self.text, F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if self.idx is not None:
            owner.register_buffer(self.idx, torch.full((1, queue_size), -100, dtype=torch.long))
        owner.register_buffer(self.ptr, torch.zeros(1, dtype=torch.long))

    def features(self, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Snapshots (clones) of the image and text queues, [embed_dim, queue_size] each, in fp32."""
        return getattr(owner, self.image).clone().float(), getattr(owner, self.text).clone().float()

    def ids(self, owner: nn.Module) -> torch.Tensor:
        """Snapshot of the id queue, [1, queue_size]."""
        return getattr(owner, self.idx).clone()

    @torch.no_grad()
    def enqueue(self, owner: nn.Module, image_feat: torch.Tensor, text_feat: torch.Tensor,
                idx: Optional[torch.Tensor] = None, gathered: bool = False) -> None:
        """Write the features of the global batch at the pointer and advance it (wrapping around).

        Args:
            image_feat, text_feat: [B, embed_dim] momentum features of this rank (or of all ranks if
                ``gathered``). idx: [B] image ids (retrieval).
        """
        if not gathered:
            image_feat, text_feat = all_gather_no_grad(image_feat), all_gather_no_grad(text_feat)
            idx = all_gather_no_grad(idx) if idx is not None else None
        image_queue, text_queue = getattr(owner, self.image), getattr(owner, self.text)
        ptr = getattr(owner, self.ptr)
        n, size = image_feat.shape[0], image_queue.shape[1]
        # as in the original: a whole number of global batches fills the queue, so a batch never wraps
        assert size % n == 0, f'queue_size {size} must be a multiple of the global batch size {n}'
        cols = (ptr + torch.arange(n, device=ptr.device)) % size          # [n]; no host sync on ptr
        image_queue.index_copy_(1, cols, image_feat.T.to(image_queue.dtype))
        text_queue.index_copy_(1, cols, text_feat.T.to(text_queue.dtype))
        if self.idx is not None:
            getattr(owner, self.idx).index_copy_(1, cols, idx.view(1, -1).to(torch.long))
        ptr.copy_((ptr + n) % size)
