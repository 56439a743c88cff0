"""Training checkpoints: the original dict layout plus what an exact resume needs, written atomically.

Layout: ``{'model', 'optimizer', 'config', 'epoch'}`` as the original scripts write it (so official
tooling and ``models.checkpoint.load_checkpoint`` read ours), plus ``'resume': {'epoch', 'step'}``
(the position to continue from), ``'scaler'`` (fp16 only) and ``'rng'`` (one state per rank, as
tensors/ints so that ``torch.load(weights_only=True)`` accepts the file).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.atomic import atomic_write_with
from engine.parallel import load_full_state, shard_optimizer_state
from models.checkpoint import CheckpointError, check_finite_state_dict, extract_state_dict, read_checkpoint
from models.layout import optimizer_state_in_our_layout

__all__ = ['save_checkpoint', 'load_training_state', 'find_latest_checkpoint', 'capture_rng_state',
           'restore_rng_state', 'restore_position', 'atomic_torch_save', 'optimizer_state_in_our_layout',
           'NonFiniteWeightsError']


def capture_rng_state() -> dict:
    """This process's torch / CUDA / numpy / python RNG states, weights_only-loadable."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_meta': [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        'python': torch.tensor(py_state[1], dtype=torch.int64),
        'python_gauss_next': py_state[2],  # random.gauss caches its second value (None or a float)
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    pos, has_gauss, cached = state['numpy_meta']
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    random.setstate((3, tuple(int(x) for x in state['python'].tolist()), state.get('python_gauss_next')))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``engine.atomic.atomic_write``: a crash at any moment leaves either the previous file
    or the new one; a temporary file that a killed writer on this host left behind (GBs for a pretraining
    checkpoint) is removed, another live writer's never."""
    return atomic_write_with(path, lambda f: torch.save(obj, f))


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN/inf; the checkpoint was not written (the one on disk is kept)."""


def check_finite_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Refuse to replace a checkpoint with broken weights (a finite loss can still give an inf gradient)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one host read
        name = next(n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all())
        raise NonFiniteWeightsError(f'{path}: not written, the model weights are not finite (first: {name}); '
                                    f'checkpoints already on disk are from before')


def check_finite_state(state: dict, path: str | os.PathLike) -> None:
    """``check_finite_weights`` for a gathered state dict."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise NonFiniteWeightsError(f'{path}: not written, the model weights are not finite (first: {bad}); '
                                    f'checkpoints already on disk are from before')


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    config: dict, epoch: int, resume_epoch: int, resume_step: int = 0,
                    scaler: Optional[torch.amp.GradScaler] = None, rng: Optional[list] = None,
                    progress: Optional[dict] = None, model_state: Optional[dict] = None,
                    optimizer_state: Optional[dict] = None) -> Path:
    """Write a checkpoint whose ``--resume`` continues at (``resume_epoch``, ``resume_step``).

    ``rng``: the RNG states of every rank (rank order); default this process's. ``progress``: what the
    script tracks across epochs (best score and epoch), restored by ``load_training_state``. Weights that
    are not finite raise ``NonFiniteWeightsError`` instead of replacing the file. ``model_state`` /
    ``optimizer_state``: the states gathered from a sharded model (``engine.parallel``) instead of ``model``'s own.
    """
    if model_state is None:
        check_finite_weights(model, path)
        model_state = model.state_dict()
    else:
        check_finite_state(model_state, path)
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict() if optimizer is not None else {}
    checkpoint = {
        'model': model_state,
        'optimizer': optimizer_state,
        'config': config,
        'epoch': epoch,
        'resume': {'epoch': resume_epoch, 'step': resume_step, 'progress': dict(progress or {})},
        'rng': rng if rng is not None else [capture_rng_state()],
    }
    if scaler is not None and scaler.is_enabled():
        checkpoint['scaler'] = scaler.state_dict()
    return atomic_torch_save(checkpoint, path)


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        scaler: Optional[torch.amp.GradScaler] = None, rank: int = 0,
                        world_size: int = 1, progress: Optional[dict] = None) -> tuple[int, int]:
    """Restore model (strict), optimizer, scaler and this rank's RNG; return (epoch, step) to continue at.
    ``progress`` (a dict) is updated with what ``save_checkpoint`` stored under that name.

    An original checkpoint (no ``'resume'``) continues at ``epoch + 1``, as the original's resume did; its
    optimizer state (every parameter, query/key/value separate) is mapped to ours by
    ``models.layout.optimizer_state_in_our_layout``.
    """
    source = str(path)
    checkpoint = read_checkpoint(source)
    for key in ('model', 'epoch'):
        if key not in checkpoint:
            raise CheckpointError(f'{source}: not a training checkpoint (no {key!r} key)')
    state_dict = extract_state_dict(checkpoint, source)
    check_finite_state_dict(state_dict, source)
    try:  # sharded (FSDP) or not: each rank takes its part of the whole tensors
        load_full_state(model, state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{source}: does not match the model: {e}') from e
    if optimizer is not None and checkpoint.get('optimizer'):
        try:
            optimizer.load_state_dict(shard_optimizer_state(
                model, optimizer, optimizer_state_in_our_layout(checkpoint['optimizer'], model, optimizer)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f'{source}: optimizer state does not match: {e}') from e
    return restore_position(checkpoint, source, scaler, rank, world_size, progress)


def restore_position(checkpoint: dict, source: str, scaler: Optional[torch.amp.GradScaler] = None, rank: int = 0,
                     world_size: int = 1, progress: Optional[dict] = None) -> tuple[int, int]:
    """What a checkpoint holds beside the weights, restored: the scaler, this rank's RNG, ``progress``; returns
    (epoch, step) to continue at. Shared by the one-file and the sharded format (``engine.sharded_checkpoint``)."""
    if scaler is not None and 'scaler' in checkpoint:
        scaler.load_state_dict(checkpoint['scaler'])
    states = checkpoint.get('rng') or []
    if len(states) == world_size:
        restore_rng_state(states[rank])
    elif states:
        # pretraining's augmentation is a function of (seed, epoch, sample) (data.loading.seeded_augmentation);
        # fine-tuning's is drawn by whichever process (loader worker or not) reads the sample
        print(f'{source}: saved with {len(states)} rank(s), resuming with {world_size}: each rank\'s RNG is '
              f're-seeded and the samples are split over the ranks differently, so dropout, ITM negative sampling '
              f'and fine-tuning augmentation differ from an uninterrupted run; pretraining\'s augmentation is '
              f'seeded per sample and stays the same')
        torch.manual_seed(int(checkpoint['epoch']) * 1_000_003 + rank)
    resume = checkpoint.get('resume') or {'epoch': int(checkpoint['epoch']) + 1, 'step': 0}
    if progress is not None:
        progress.update(resume.get('progress') or {})
    return int(resume['epoch']), int(resume['step'])


_EPOCH_FILE = re.compile(r'checkpoint_(\d+)\.pth$')


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """``checkpoint_last.pth`` (written at every save point) or else the highest ``checkpoint_NN.pth``."""
    output_dir = Path(output_dir)
    last = output_dir / 'checkpoint_last.pth'
    if last.is_file():
        return last
    numbered = [(int(m.group(1)), p) for p in output_dir.glob('checkpoint_*.pth') if (m := _EPOCH_FILE.search(p.name))]
    return max(numbered)[1] if numbered else None
