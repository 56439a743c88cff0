"""How the training model is spread over the processes: ``parallel: ddp`` or ``parallel: fsdp`` (FSDP2).

``ddp`` (default): every rank holds the whole model, its gradients and the AdamW moments; gradients are
all-reduced (``DistributedDataParallel``). ``fsdp``: ``torch.distributed.fsdp.fully_shard`` shards parameters,
gradients and optimizer state over the ranks, one unit per ViT block and MED layer (and per module shared
between two of them, and per encoder with a momentum twin); a unit's weights are gathered for its forward and
backward only. The momentum twins are sharded as their online modules, so the EMA update is shard-local.

One seam for the runner (``engine.runner.Run``) and nothing else:

* ``wrap(model, mode, ...)``: the model to train (build the optimizer *after* it: FSDP replaces parameters);
* ``unwrap`` / ``eval_model``: the module whose methods (``generate``, ``forward`` with other ranks doing
  something else) evaluation calls; under FSDP its weights are gathered whole until ``train_mode``;
* ``full_state_dict`` / ``full_optimizer_state`` / ``load_full_state`` / ``shard_optimizer_state``: checkpoints
  in the one-file layout of the single-process model (original keys through the model's own state-dict hooks,
  fp32 CPU tensors); collective under FSDP, loadable with any world size.

Works on the CPU with gloo as on CUDA with NCCL (the tests run FSDP2 on a CPU device mesh).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from models.collectives import get_world_size

__all__ = ['PARALLEL_MODES', 'wrap', 'checkpoint_med_layers', 'unwrap', 'is_sharded', 'eval_model', 'train_mode',
           'full_state_dict', 'full_optimizer_state', 'load_full_state', 'shard_optimizer_state', 'shard_units']

PARALLEL_MODES = ('ddp', 'fsdp')


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``wrap(..., 'fsdp')``."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself: DDP's ``.module``; a sharded model is its own module (``fully_shard`` works in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- wrapping

def wrap(model: nn.Module, mode: str, device: torch.device, precision: str = 'none',
         find_unused_parameters: bool = False, checkpoint_med: bool = False, own_grad_sync: bool = False) -> nn.Module:
    """The model to train under ``mode`` (``PARALLEL_MODES``); the model itself without a process group.

    ``precision`` (the run's ``amp``) sets FSDP's mixed precision: ``bf16`` / ``fp16`` gather parameters in
    that type and reduce gradients in fp32 (``MixedPrecisionPolicy``); the sharded master weights and the
    optimizer state stay fp32 as under DDP. ``checkpoint_med``: every MED layer recomputes its activations in
    the backward pass (``checkpoint_med_layers``; the ViT's own is ``vit_grad_ckpt``). ``own_grad_sync``
    (``ddp``): the training step averages the gradients itself (``engine.cuda_graph.TrainStep``), so the model
    stays unwrapped, every rank starting from rank 0's weights as DDP would.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f'parallel must be one of {PARALLEL_MODES}, got {mode!r}')
    if checkpoint_med:
        checkpoint_med_layers(model)
    if get_world_size() == 1:
        return model
    if mode == 'ddp' and own_grad_sync:
        broadcast_from_rank0(model)
        return model
    if mode == 'ddp':
        device_ids = [device.index] if device.type == 'cuda' else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                   find_unused_parameters=find_unused_parameters)
    return _fully_shard(model, device, precision)


def checkpoint_med_layers(model: nn.Module) -> int:
    """Activation checkpointing of every MED layer, by hooks (``torch.distributed._composable.checkpoint``): module
    names, state-dict keys and checkpoints are unchanged. Applied before sharding, as FSDP2 expects. Returns how
    many layers."""
    from torch.distributed._composable import checkpoint
    from models.med import Layer
    layers = [m for m in model.modules() if isinstance(m, Layer)]
    for layer in layers:
        checkpoint(layer)
    return len(layers)


def _fully_shard(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from models.momentum import PinnedPairs

    broadcast_from_rank0(model)  # as DDP does: every rank starts from rank 0's weights and queues
    mesh = init_device_mesh(device.type, (get_world_size(),))
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    scalars = _replicate_scalars(model)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    # the momentum EMA must see the sharded fp32 parameters, not the gathered copies a forward swaps in
    for module in model.modules():
        if getattr(module, 'model_pairs', None) is not None:
            module.model_pairs = PinnedPairs(module.model_pairs)
    return model


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (what DDP does when it wraps a model)."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def _replicate_scalars(model: nn.Module) -> set[nn.Parameter]:
    """0-d parameters (the ITC temperature ``temp``, a scalar in the checkpoint layout) cannot be sharded: every
    rank keeps the whole one and its gradient is averaged over the ranks as it arrives (before accumulation,
    so ``accum_steps`` sums averages as DDP does)."""
    world = get_world_size()
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_hook(lambda grad: _averaged(grad, world))
    return scalars


def _averaged(grad: torch.Tensor, world: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / world


def _is_layer(module: nn.Module) -> bool:
    """A transformer block: timm's ViT ``Block`` or MED's ``Layer`` (the units of sharding and of checkpointing)."""
    from timm.models.vision_transformer import Block
    from models.med import Layer
    return isinstance(module, (Block, Layer))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` makes their own unit, children before parents (then the root holds the rest).

    Candidates: every ViT block and MED layer; every cross-attention key/value projection (called on its own);
    every module reached through two paths (pretraining's encoder and
    decoder share cross-attention and FFN modules, ``share_encoder_decoder``); every module with a momentum twin
    and the twin. A candidate becomes a unit only if none of its parameters (outside units made before) is also
    reached from outside it: a tied parameter (the word embeddings in the LM head) stays with the root, which
    gathers it for the whole forward.
    """
    # a cross-attention's key/value projection is called outside its layer's forward (``MED.precompute_cross_kv``
    # projects the image once for many texts), so it gathers its weights itself
    from models.med import Attention
    called_alone = {id(m.kv) for m in model.modules() if isinstance(m, Attention) and hasattr(m, 'kv')}
    paired = {id(m) for owner in model.modules() for pair in (getattr(owner, 'model_pairs', None) or ())
              for m in pair}
    paths: dict[int, int] = {}
    parents: dict[int, list[int]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths[id(module)] = paths.get(id(module), 0) + 1
        if name:
            parents.setdefault(id(module), []).append(id(model.get_submodule(name.rpartition('.')[0])))
    # a shared module is one unit: the outermost module reached through more paths than its parents
    shared = {m for m, n in paths.items() if n > 1 and any(paths[p] < n for p in parents.get(m, []))}
    units: list[nn.Module] = []
    done: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in done:
            return
        done.add(id(module))
        for child in module.children():
            visit(child)
        if module is model:
            return
        candidate = _is_layer(module) or id(module) in shared or id(module) in paired or id(module) in called_alone
        owned = _own_parameters(module, units)
        if candidate and owned and not owned & _parameters_outside(model, module):
            units.append(module)

    visit(model)
    return units


def _own_parameters(module: nn.Module, units: list[nn.Module]) -> set[int]:
    """Ids of ``module``'s parameters that no unit in ``units`` inside it holds."""
    inner = {id(p) for u in units for p in u.parameters()}
    return {id(p) for p in module.parameters() if id(p) not in inner}


def _parameters_outside(model: nn.Module, module: nn.Module) -> set[int]:
    """Ids of the parameters reached from ``model`` without passing through ``module``."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if m is module or id(m) in seen:
            continue
        seen.add(id(m))
        found.update(id(p) for p in m._parameters.values() if p is not None)
        stack.extend(m._modules.values())
    return found


# ---------------------------------------------------------------------------------------------- evaluation

def eval_model(model: nn.Module) -> nn.Module:
    """The module evaluation calls (any method, any number of calls per rank).

    Under FSDP every unit's weights are gathered and kept gathered (no re-sharding after a forward, so no
    collective while ranks evaluate different numbers of batches) until ``train_mode``: the memory of one
    whole model per rank, as under DDP, for the evaluation only.
    """
    module = unwrap(model)
    if is_sharded(module):
        for unit in _fsdp_modules(module):
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
    return module


def train_mode(model: nn.Module) -> None:
    """Undo ``eval_model``: shards only, re-sharded after each unit's forward (the root keeps its own)."""
    module = unwrap(model)
    if is_sharded(module):
        for unit in _fsdp_modules(module):
            unit.set_reshard_after_forward(unit is not module, recurse=False)
            unit.reshard()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


# ---------------------------------------------------------------------------------------------- checkpoints

def _full(t, keep: bool):
    """A whole CPU tensor from a DTensor (a collective: every rank calls it) or a tensor; None where not ``keep``."""
    if hasattr(t, 'full_tensor'):
        t = t.full_tensor()
    return t.detach().cpu() if keep and torch.is_tensor(t) else (t if keep else None)


def full_state_dict(model: nn.Module, keep: bool = True) -> Optional[dict]:
    """The model's state dict in the single-process layout (original keys through the model's own state-dict
    hooks), whole tensors. Collective under FSDP (every rank calls it, in the same order); the CPU copy is made
    where ``keep`` (rank 0, which writes the file), the other ranks get None."""
    module = unwrap(model)
    if not is_sharded(module):
        return module.state_dict() if keep else None
    train_mode(module)  # the sharded parameters (state_dict re-shards each unit anyway)
    state = {k: _full(v, keep) for k, v in module.state_dict().items()}
    return state if keep else None


def full_optimizer_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                         keep: bool = True) -> Optional[dict]:
    """``optimizer.state_dict()`` with whole CPU tensors (the DDP layout: states by parameter index); collective
    and rank-0-kept as ``full_state_dict``."""
    if optimizer is None:
        return {} if keep else None
    if not is_sharded(unwrap(model)):
        return optimizer.state_dict() if keep else None
    state = optimizer.state_dict()
    whole = {i: {k: _full(v, keep) for k, v in s.items()} for i, s in sorted(state['state'].items())}
    return {'state': whole, 'param_groups': state['param_groups']} if keep else None


def load_full_state(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a single-process-layout state dict (whole tensors, original keys) into ``model``, sharded or not;
    returns ``load_state_dict``'s missing / unexpected keys."""
    module = unwrap(model)
    if not is_sharded(module):
        return module.load_state_dict(state_dict, strict=strict)
    train_mode(module)
    # each rank keeps its own shard of every whole tensor: the DTensors the hooks and copies then see
    from torch.distributed.tensor import DTensor, distribute_tensor
    local = module.state_dict()  # DTensors (parameters) and tensors (buffers) under the checkpoint keys
    converted = {}
    for key, value in state_dict.items():
        target = local.get(key)
        if isinstance(target, DTensor) and value.shape == target.shape:
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
        converted[key] = value
    return module.load_state_dict(converted, strict=strict)


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole-tensor optimizer state (``full_optimizer_state``'s layout) as ``optimizer`` of a sharded model holds
    it: each tensor of a DTensor parameter's state becomes this rank's shard of it."""
    if not is_sharded(unwrap(model)):
        return state
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in optimizer.param_groups for p in g['params']]
    ids = [i for g in state['param_groups'] for i in g['params']]
    by_id = dict(zip(ids, params))
    out = {}
    for i, s in state['state'].items():
        p = by_id[i]
        out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {'state': out, 'param_groups': state['param_groups']}
