"""Checkpoint layout: fused <-> original attention keys (weights and optimizer state); keys a checkpoint may lack.

One seam for everything that translates between what the model holds and what a checkpoint file holds
(as timm's ``checkpoint_filter_fn`` or torchtitan's state-dict adapters):

  * MED's attention fuses query/key/value into ``qkv`` (self-attention) and key/value into ``kv``
    (cross-attention). ``register_fused_layout`` gives such a module state-dict hooks so that
    ``state_dict()`` writes, and ``load_state_dict`` reads, the original per-projection keys: official
    checkpoints load strictly and files we write are the original's (full state dicts, as FSDP's
    full-state-dict save/load use, pass through the same hooks).
  * ``optimizer_state_in_our_layout`` maps an optimizer state saved with separate projections (the
    original code's, or ours before the fusion) onto the fused parameters.
  * ``MAY_BE_MISSING`` declares, per model factory, the keys a checkpoint may leave at their initial values;
    ``check_missing`` refuses any other gap.

The Hugging Face ``transformers`` layout is mapped in ``models/convert_hf.py``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

# Original per-projection key names of each fused parameter (the checkpoint layout), in concatenation order.
FUSED_PARTS = {'qkv': ('query', 'key', 'value'), 'kv': ('key', 'value')}
# Set on the modules whose ``qkv`` / ``kv`` children are fused projections (``register_fused_layout``).
_FUSED_MARK = '_fused_checkpoint_layout'


# ---------------------------------------------------------------------------------------------- weights

def register_fused_layout(module: nn.Module) -> None:
    """Make ``module``'s fused ``qkv`` / ``kv`` linears save and load as the original ``query/key/value``.

    The original-layout tensors ``state_dict()`` gives are views of the fused parameters (no copies), so
    safetensors' ``save_file`` needs them cloned (``torch.save`` stores the shared storage once).
    """
    setattr(module, _FUSED_MARK, True)
    module.register_state_dict_post_hook(split_fused_state)
    module.register_load_state_dict_pre_hook(merge_fused_state)


def split_fused_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: write ``qkv.*`` / ``kv.*`` as the original ``query.*``, ``key.*``, ``value.*``."""
    parts = {}
    for fused, names in FUSED_PARTS.items():
        if not hasattr(module, fused):
            continue
        for suffix in ('weight', 'bias'):
            chunks = state_dict.pop(f'{prefix}{fused}.{suffix}').chunk(len(names), 0)
            parts.update({f'{name}.{suffix}': chunk for name, chunk in zip(names, chunks)})
    # re-inserted in the original order; a cross-attention's query is its own module (already saved, moved too)
    for name in ('query', 'key', 'value'):
        for suffix in ('weight', 'bias'):
            key = f'{prefix}{name}.{suffix}'
            if f'{name}.{suffix}' in parts:
                state_dict[key] = parts[f'{name}.{suffix}']
            elif key in state_dict:
                state_dict[key] = state_dict.pop(key)


def merge_fused_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: concatenate the original ``query/key/value`` tensors into ``qkv`` / ``kv``.

    Parts the state dict lacks keep the model's current values and are reported under their original names
    in ``missing_keys`` (what loading the unfused layout would do); a part of the wrong shape is an error
    under its original name. A state dict already in the fused layout loads as it is.
    """
    for fused, names in FUSED_PARTS.items():
        linear = getattr(module, fused, None)
        if linear is None:
            continue
        for suffix in ('weight', 'bias'):
            fused_key = f'{prefix}{fused}.{suffix}'
            keys = [f'{prefix}{name}.{suffix}' for name in names]
            if fused_key in state_dict and not any(k in state_dict for k in keys):
                continue
            current = getattr(linear, suffix).detach().chunk(len(names), 0)
            chunks, ok = [], True
            for key, own in zip(keys, current):
                if key not in state_dict:
                    missing_keys.append(key)
                    chunks.append(None)
                    continue
                value = state_dict.pop(key)
                if value.shape != own.shape:
                    error_msgs.append(f'size mismatch for {key}: copying a param with shape {tuple(value.shape)} '
                                      f'from checkpoint, the shape in current model is {tuple(own.shape)}.')
                    ok = False
                chunks.append(value)
            if ok:
                # parts from the file stay where they are (load copies them to the parameter's device, or
                # assigns them); parts the file lacks are the current values, brought to the file's device
                device = next((c.device for c in chunks if c is not None), current[0].device)
                state_dict[fused_key] = torch.cat(
                    [own.to(device) if c is None else c for c, own in zip(chunks, current)], 0)


def checkpoint_parameter_names(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(name, parts)`` for each parameter of ``model.parameters()``: ``parts`` are the checkpoint-layout names
    of the tensors it holds, in the order it concatenates them (``...qkv.weight`` -> the query, key and value
    weights; an unfused parameter -> itself).

    The original code registered query/key/value as separate parameters, so ``[n for _, ps in ... for n in ps]``
    ordered as the original registered them (see ``original_parameter_order``) indexes its optimizer state.
    """
    out = []
    for name, _ in model.named_parameters():
        prefix, _, leaf = name.rpartition('.')
        module_prefix, _, fused = prefix.rpartition('.')
        if fused in FUSED_PARTS and getattr(model.get_submodule(module_prefix), _FUSED_MARK, False):
            base = f'{module_prefix}.' if module_prefix else ''
            out.append((name, [f'{base}{part}.{leaf}' for part in FUSED_PARTS[fused]]))
        else:
            out.append((name, [name]))
    return out


def original_parameter_order(model: nn.Module) -> list[str]:
    """Checkpoint-layout names in the order of the original code's ``model.parameters()``: each fused
    projection expands, where it stands, to query/key/value weight and bias, Linear by Linear."""
    order = []
    for name, parts in checkpoint_parameter_names(model):
        if len(parts) == 1:
            order.append(name)
        elif name.endswith('.weight'):  # the fused bias follows the fused weight; both expand here
            order += [n for part in parts for n in (part, part[:-len('weight')] + 'bias')]
    return order


# ---------------------------------------------------------------------------------------------- optimizer

def optimizer_state_in_our_layout(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``saved`` optimizer state as ``optimizer`` holds parameters: MED's attention projections fused, frozen
    parameters left out.

    Three layouts are recognised by their parameter count: ours (returned as it is); the original code's,
    one AdamW group over every parameter of ``model.parameters()`` (momentum copies included; they have no
    state) with query, key and value separate; and ours before the projections were fused (trainable
    parameters only, separate). A fused parameter's state is its parts' moments concatenated as its weights
    are; if any part has no state, none is kept for it (AdamW starts it afresh). Hyper-parameters (lr,
    betas, eps, weight decay) come from the file, as ``load_state_dict`` takes them.
    """
    ours = optimizer.state_dict()
    our_ids = [i for g in ours['param_groups'] for i in g['params']]
    saved_ids = [i for g in saved['param_groups'] for i in g['params']]
    if len(saved_ids) == len(our_ids):
        return saved
    parts_of = dict(checkpoint_parameter_names(model))
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g['params']]
    if any(id(p) not in name_of for p in params):
        raise ValueError('the optimizer holds parameters that are not the model\'s')
    trainable = {n for p in params for n in parts_of[name_of[id(p)]]}
    every = original_parameter_order(model)
    trainable_only = [n for n in every if n in trainable]
    layouts = {len(every): every, len(trainable_only): trainable_only}
    if len(saved_ids) not in layouts or len(saved['param_groups']) != 1 or len(ours['param_groups']) != 1:
        raise ValueError(f'{len(saved_ids)} parameters in {len(saved["param_groups"])} group(s) in the file; this '
                         f'optimizer has {len(our_ids)}, the original layout of this model {len(every)} (frozen '
                         f'included) or {len(trainable_only)} (trainable only)')
    by_name = {n: saved['state'][i] for n, i in zip(layouts[len(saved_ids)], saved_ids) if i in saved['state']}
    state = {}
    for i, p in zip(our_ids, params):
        entries = [by_name.get(n) for n in parts_of[name_of[id(p)]]]
        if any(e is None for e in entries):
            continue
        state[i] = {key: torch.cat([e[key] for e in entries]) if torch.is_tensor(value) and value.dim() else value
                    for key, value in entries[0].items()}
    group = {**ours['param_groups'][0], **{k: v for k, v in saved['param_groups'][0].items() if k != 'params'}}
    return {'state': state, 'param_groups': [{**group, 'params': our_ids}]}


# ---------------------------------------------------------------------------------------------- missing keys

# Retrieval's queue buffers: a pretrain checkpoint has no idx_queue/ptr_queue; queues of another size are dropped.
QUEUE_KEYS = ('image_queue', 'text_queue', 'idx_queue', 'ptr_queue', 'queue_ptr')
MOMENTUM_PREFIXES = ('visual_encoder_m.', 'vision_proj_m.', 'text_encoder_m.', 'text_proj_m.')


def momentum_keys(keys: Iterable[str]) -> set[str]:
    """The momentum encoders' keys among ``keys``."""
    return {k for k in keys if k.startswith(MOMENTUM_PREFIXES)}


def _none(own: set[str], missing: set[str]) -> set[str]:
    return set()


def _nlvr_new_heads(own: set[str], missing: set[str]) -> set[str]:
    """A pretrain/retrieval checkpoint has no ``merge_layer`` or ``cls_head`` (new for NLVR2)."""
    return {k for k in own if k.startswith('cls_head.') or '.merge_layer.' in k}


def _vqa_decoder_cross_kv(own: set[str], missing: set[str]) -> set[str]:
    """A ViT-L pretrain decoder's cross-attention K/V, dropped by ``BLIP_VQA.remap_checkpoint``."""
    return {k for k in own if k.startswith('text_decoder.bert.encoder.layer.')
            and '.crossattention.self.' in k and k.endswith(('key.weight', 'value.weight'))}


def _retrieval_fresh_state(own: set[str], missing: set[str]) -> set[str]:
    """Queues and ``temp`` (ITM layout, other queue size), and the momentum encoders only all at once (ITM
    layout: the factory copies them from the online weights)."""
    momentum = momentum_keys(own)
    return set(QUEUE_KEYS) | {'temp'} | (momentum if momentum <= missing else set())


# Per model factory: own keys, missing keys -> the missing keys that are allowed (the rest are an error).
MAY_BE_MISSING: dict[str, Callable[[set[str], set[str]], set[str]]] = {
    'blip_decoder': _none,
    'blip_feature_extractor': _none,
    'blip_itm': _none,
    'blip_nlvr': _nlvr_new_heads,
    'blip_vqa': _vqa_decoder_cross_kv,
    'blip_retrieval': _retrieval_fresh_state,
}


def check_missing(factory: str, model: nn.Module, missing_keys: Iterable[str], source: str) -> set[str]:
    """Raise ``CheckpointError`` if ``source`` left keys of ``model`` at their initial values that
    ``MAY_BE_MISSING[factory]`` does not allow; return the allowed keys that are missing."""
    from models.checkpoint import CheckpointError  # at use: models.med imports this module, and checkpoint the ViT
    missing = set(missing_keys)
    allowed = MAY_BE_MISSING[factory](set(model.state_dict()), missing) & missing
    unexplained = sorted(missing - allowed)
    if unexplained:
        raise CheckpointError(f'{factory}: checkpoint {source} lacks {len(unexplained)} key(s) the model needs, '
                              f'e.g. {unexplained[:5]}')
    return allowed


def load_pretrained(model: nn.Module, pretrained: str, factory: str) -> set[str]:
    """What every factory does with its ``pretrained`` argument: load the checkpoint (``load_checkpoint``), if any,
    and refuse gaps ``MAY_BE_MISSING[factory]`` does not declare; returns the declared keys that were missing."""
    if not pretrained:
        return set()
    from models.checkpoint import load_checkpoint  # at use, as in check_missing
    keys = set(model.state_dict())
    # the keys this factory may leave at their initial values are logged apart from the missing ones
    _, msg = load_checkpoint(model, pretrained, fresh=frozenset(MAY_BE_MISSING[factory](keys, keys)))
    return check_missing(factory, model, msg.missing_keys, pretrained)
