"""Sharded resume points (``checkpoint_format: sharded``): torch.distributed.checkpoint (DCP) directories.

Under ``parallel: fsdp`` the one-file format (``engine.checkpoint_io``) gathers every weight and AdamW moment to
rank 0; a sharded resume point has every rank write its own shards instead, in parallel, and DCP re-shards them
on load, so a run resumes with any number of processes (one included, without a process group).

A sharded checkpoint is a directory ``checkpoint_last.dcp/`` holding

* DCP's files: ``{'model': ..., 'optimizer': ...}``; the model state in the original key layout (the model's own
  state-dict hooks: query/key/value separate), the momentum encoders and the ITC queues included; the optimizer
  state keyed by parameter name (``torch.distributed.checkpoint.state_dict``, which any world size maps back);
* ``meta.pth`` (rank 0, ``weights_only``-loadable): what the one-file format holds beside the weights (config,
  epoch, resume position and progress, every rank's RNG state, the fp16 scaler), the model keys in order, and the
  keys that name a tensor an earlier key names (shared modules, tied weights: written once, as ``torch.save`` does).

It is written under a temporary name and renamed when complete; the directory it replaces is first renamed to
``checkpoint_last.dcp.old`` and removed last, so a kill at any moment leaves one complete checkpoint that
``find_resume_point`` finds. ``sharded_to_full`` / ``python -m engine.convert_checkpoint`` make the one-file
checkpoint of the single-process model, ``predict.py`` and the original code out of it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.atomic import _fsync_dir
from engine.checkpoint_io import (NonFiniteWeightsError, capture_rng_state, check_finite_state, find_latest_checkpoint,
                                  restore_position)
from engine.parallel import train_mode, unwrap
from models.checkpoint import CheckpointError, torch_load_checked

__all__ = ['CHECKPOINT_FORMATS', 'SHARDED_SUFFIX', 'META_FILE', 'save_sharded_checkpoint', 'is_sharded_checkpoint',
           'check_sharded_checkpoint', 'load_sharded_training_state', 'aliases', 'find_resume_point', 'sharded_to_full',
           'remove_sharded_checkpoints']

CHECKPOINT_FORMATS = ('full', 'sharded')
SHARDED_SUFFIX = '.dcp'
META_FILE = 'meta.pth'
_DCP_METADATA = '.metadata'  # DCP's coordinator writes it after every rank's shards
_FORMAT_VERSION = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _old(path: Path) -> Path:
    return path.with_name(path.name + '.old')


def _temp_prefix(path: Path) -> str:
    return f'.{path.name}.'


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (complete or not): a ``.dcp`` folder, or a folder
    with DCP's metadata file."""
    path = Path(path)
    return path.is_dir() and (path.suffix == SHARDED_SUFFIX or (path / _DCP_METADATA).exists()
                              or (path / META_FILE).exists())


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns on every call without a process group that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def _complete(path: Path) -> bool:
    return (path / _DCP_METADATA).is_file() and (path / META_FILE).is_file()


def check_sharded_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete sharded checkpoint, else one ``CheckpointError`` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'{path}: no such sharded checkpoint directory')
    if not path.is_dir():
        raise CheckpointError(f'{path}: not a sharded checkpoint (a file, not a {SHARDED_SUFFIX} directory)')
    missing = [n for n in (_DCP_METADATA, META_FILE) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f'{path}: incomplete sharded checkpoint (no {" and no ".join(missing)}): its writer '
                              f'stopped before it finished; resume from the complete one beside it '
                              f'({path.name}.old, or --resume auto) or from a one-file checkpoint_*.pth')
    return path


# ---------------------------------------------------------------------------------------------- saving

def aliases(module: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{key: first_key}`` for the state-dict keys that name what an earlier key names: the tensors of a module
    reached by two paths (pretraining's encoder and decoder share cross-attention and FFN modules) and tied
    parameters (the word embeddings and the LM head). DCP would write each of them again; the one-file format's
    ``torch.save`` stores a shared tensor once."""
    first_prefix: dict[int, str] = {}
    prefixes: dict[str, str] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        prefix = f'{name}.' if name else ''
        if first_prefix.setdefault(id(m), prefix) != prefix:
            prefixes[prefix] = first_prefix[id(m)]
    first_name: dict[int, str] = {}
    out = {n: first_name[id(p)] for n, p in module.named_parameters(remove_duplicate=False)
           if first_name.setdefault(id(p), n) != n}
    present = set(keys)
    for key in keys:
        for prefix in sorted((p for p in prefixes if key.startswith(p)), key=len):  # the outermost shared module
            same = prefixes[prefix] + key[len(prefix):]
            if same in present and same != key:
                out[key] = same
                break
    while any(v in out for v in out.values()):  # chains (a tied parameter inside a shared module) end at the first
        out = {k: out.get(v, v) for k, v in out.items()}
    return {k: v for k, v in out.items() if k in present and v in present and k != v}


def _states(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """The DCP state dict of ``model`` (sharded or not; collective under FSDP): the original-layout model state and
    the optimizer state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    module = unwrap(model)
    train_mode(module)  # the sharded parameters, not an evaluation's gathered copies
    states = {'model': module.state_dict()}
    if optimizer is not None:
        states['optimizer'] = get_optimizer_state_dict(module, optimizer)
    return states


def _shared_name(path: Path) -> Path:
    """A fresh temporary directory beside ``path``, the same on every rank (rank 0 draws it)."""
    name = [f'{_temp_prefix(path)}{secrets.token_hex(4)}.tmp']
    if _distributed():
        dist.broadcast_object_list(name, src=0)
    return path.with_name(name[0])


def _publish(tmp: Path, path: Path) -> None:
    """Put the complete ``tmp`` in ``path``'s place: the previous one moves to ``.old`` first (a kill between the
    renames leaves it for ``find_resume_point``) and goes last."""
    old = _old(path)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _remove_stale_temps(path: Path, keep: Path) -> None:
    """Temporary directories of ``path`` that a killed run left (the output folder's lock rules out a live
    writer other than this run)."""
    for tmp in path.parent.glob(f'{_temp_prefix(path)}*.tmp'):
        if tmp != keep and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def save_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                            config: dict, epoch: int, resume_epoch: int, resume_step: int = 0,
                            scaler: Optional[torch.amp.GradScaler] = None, rng: Optional[list] = None,
                            progress: Optional[dict] = None) -> Path:
    """Write a sharded checkpoint whose resume continues at (``resume_epoch``, ``resume_step``); collective: every
    rank calls it. Arguments as ``engine.checkpoint_io.save_checkpoint`` (``rng``: every rank's state, rank order,
    kept by rank 0). Weights that are not finite raise ``NonFiniteWeightsError`` on every rank before anything is
    written."""
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    states = _states(model, optimizer)
    keys = list(states['model'])
    same = aliases(unwrap(model), keys)
    states['model'] = {k: v for k, v in states['model'].items() if k not in same}
    local = {k: (v.to_local() if hasattr(v, 'to_local') else v) for k, v in states['model'].items()}
    finite = torch.tensor([all(bool(torch.isfinite(v).all()) for v in local.values() if v.is_floating_point())])
    if _distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        check_finite_state(local, path)  # names the first bad key where this rank holds one
        raise NonFiniteWeightsError(f'{path}: not written, the model weights are not finite (in another rank\'s '
                                    f'shards); checkpoints already on disk are from before')
    tmp = _shared_name(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path, keep=tmp)
    if _distributed():
        dist.barrier()
    with _one_process_is_intended():
        dcp.save(states, checkpoint_id=tmp, no_dist=not _distributed())
    if _rank() == 0:
        meta = {'format': _FORMAT_VERSION, 'config': config, 'epoch': epoch,
                'resume': {'epoch': resume_epoch, 'step': resume_step, 'progress': dict(progress or {})},
                'rng': rng if rng is not None else [capture_rng_state()],
                'world_size': dist.get_world_size() if _distributed() else 1,
                'model_keys': keys, 'aliases': same}
        if scaler is not None and scaler.is_enabled():
            meta['scaler'] = scaler.state_dict()
        with open(tmp / META_FILE, 'wb') as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    if _distributed():
        dist.barrier()  # no rank continues (or resumes) before the directory is in place
    return path


# ---------------------------------------------------------------------------------------------- loading

def _read_meta(path: Path) -> dict:
    meta = torch_load_checked(path / META_FILE)
    if not isinstance(meta, dict) or meta.get('format') != _FORMAT_VERSION:
        raise CheckpointError(f'{path / META_FILE}: not the metadata of a sharded checkpoint of this code '
                              f'(format {meta.get("format") if isinstance(meta, dict) else "?"!r}, expected '
                              f'{_FORMAT_VERSION})')
    return meta


def _check_matches(path: Path, saved, states: dict) -> None:
    """One message for every way the checkpoint's model keys and shapes differ from those ``states`` reads."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    theirs = {k: tuple(m.size) for k, m in saved.state_dict_metadata.items()
              if k.startswith('model.') and isinstance(m, TensorStorageMetadata)}
    ours = {f'model.{k}': tuple(v.shape) for k, v in states['model'].items()}
    missing = [k[6:] for k in ours if k not in theirs]
    unexpected = [k[6:] for k in theirs if k not in ours]
    shapes = [f'{k[6:]} {theirs[k]} vs {s}' for k, s in ours.items() if k in theirs and theirs[k] != s]
    if missing or unexpected or shapes:
        parts = [f'{len(v)} {what} (first: {", ".join(v[:3])})'
                 for what, v in (('missing keys', missing), ('unexpected keys', unexpected),
                                 ('shapes differ (file vs model)', shapes)) if v]
        raise CheckpointError(f'{path}: sharded checkpoint does not match the model: {"; ".join(parts)}')
    if 'optimizer' in states and not any(k.startswith('optimizer.') for k in saved.state_dict_metadata):
        states.pop('optimizer')  # saved without an optimizer (none to restore): AdamW starts afresh


def load_sharded_training_state(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                                scaler: Optional[torch.amp.GradScaler] = None, rank: int = 0, world_size: int = 1,
                                progress: Optional[dict] = None) -> tuple[int, int]:
    """``engine.checkpoint_io.load_training_state`` for a sharded checkpoint (collective where distributed): every
    rank reads its own shards of the model and optimizer state, whatever the world size it was saved with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    path = check_sharded_checkpoint(path)
    meta = _read_meta(path)
    states = _states(model, optimizer)
    keys = list(states['model'])
    same = meta.get('aliases', {})  # a key the file holds under another one reads from there
    by_file_key: dict = {}
    for k in keys:
        by_file_key.setdefault(same.get(k, k), states['model'][k])
    states['model'] = by_file_key
    reader = dcp.FileSystemReader(str(path))
    _check_matches(path, reader.read_metadata(), states)
    try:
        with _one_process_is_intended():
            dcp.load(states, storage_reader=reader, no_dist=not _distributed())
    except Exception as e:  # DCP's own errors (a missing optimizer entry, a damaged shard file) name no file
        raise CheckpointError(f'{path}: cannot read the sharded checkpoint into this model and optimizer '
                              f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e})') from e
    module = unwrap(model)
    loaded = {k: states['model'][same.get(k, k)] for k in keys}
    try:  # the loaded original-layout tensors go through the model's hooks into its own (fused) parameters
        module.load_state_dict(loaded, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{path}: does not match the model: {e}') from e
    if 'optimizer' in states:
        set_optimizer_state_dict(module, optimizer, states['optimizer'])
    return restore_position(meta, str(path), scaler, rank, world_size, progress)


# ---------------------------------------------------------------------------------------------- finding

def _newest_complete(path: Path) -> Optional[Path]:
    for candidate in (path, _old(path)):  # .old: a kill between the two renames of _publish
        if candidate.is_dir() and _complete(candidate):
            return candidate
    return None


def find_resume_point(output_dir: str | os.PathLike) -> Optional[Path]:
    """What ``--resume auto`` continues from: the complete sharded ``checkpoint_last.dcp`` or the one-file
    checkpoint ``find_latest_checkpoint`` picks, whichever was written last (a run may switch formats)."""
    output_dir = Path(output_dir)
    sharded = _newest_complete(output_dir / f'checkpoint_last{SHARDED_SUFFIX}')
    full = find_latest_checkpoint(output_dir)
    if sharded is None or full is None:
        return sharded or full
    return sharded if (sharded / META_FILE).stat().st_mtime >= full.stat().st_mtime else full


def remove_sharded_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``--overwrite``: every sharded checkpoint of an earlier run in ``output_dir`` (complete or not)."""
    output_dir = Path(output_dir)
    found = [p for p in [*output_dir.glob(f'checkpoint_*{SHARDED_SUFFIX}'),
                         *output_dir.glob(f'checkpoint_*{SHARDED_SUFFIX}.old'),
                         *output_dir.glob(f'.checkpoint_*{SHARDED_SUFFIX}.*.tmp')] if p.is_dir()]
    for p in found:
        shutil.rmtree(p)
    return found


# ---------------------------------------------------------------------------------------------- converting

def sharded_to_full(path: str | os.PathLike) -> dict:
    """The one-file checkpoint (``engine.checkpoint_io.save_checkpoint``'s layout) of a sharded one, read in this
    process without the model: whole tensors, model keys in the original layout and order, the optimizer state
    by parameter index as ``optimizer.state_dict()`` of the single-process model numbers it."""
    import torch.distributed.checkpoint as dcp
    # what DCP's own dcp_to_torch_save calls (public dcp.load fills a copy of the dict, not the empty one given)
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    path = check_sharded_checkpoint(path)
    meta = _read_meta(path)
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read the sharded checkpoint ({type(e).__name__}: {e})') from e
    model = state.get('model', {})
    same = meta.get('aliases', {})
    missing = [k for k in meta['model_keys'] if same.get(k, k) not in model]
    if missing:
        raise CheckpointError(f'{path}: incomplete sharded checkpoint: {len(missing)} model keys of {META_FILE} have '
                              f'no tensors (first: {", ".join(missing[:3])})')
    full = {'model': {k: model[same.get(k, k)] for k in meta['model_keys']},  # an alias: the very tensor
            'optimizer': _optimizer_by_index(state['optimizer']) if 'optimizer' in state else {},
            'config': meta['config'], 'epoch': meta['epoch'], 'resume': meta['resume'], 'rng': meta['rng']}
    if 'scaler' in meta:
        full['scaler'] = meta['scaler']
    return full


def _optimizer_by_index(named: dict) -> dict:
    """An optimizer state keyed by parameter name (``get_optimizer_state_dict``) keyed by index instead, the
    parameters numbered across the groups in order, as ``torch.optim.Optimizer.state_dict`` does."""
    index: dict[str, int] = {}
    groups = []
    for group in named['param_groups']:
        ids = [index.setdefault(name, len(index)) for name in group['params']]
        groups.append({**group, 'params': ids})
    state = {index[name]: s for name, s in sorted(named['state'].items(), key=lambda kv: index[kv[0]])}
    return {'state': state, 'param_groups': groups}
