"""The one training loop every script uses: per-step LR, AMP, accumulation, clipping, NaN guard.

A script supplies ``step_fn(model, batch, step) -> {loss_name: scalar tensor}``; ``train_one_epoch`` takes
it in a ``StepPlan`` (what a step is: step_fn, optimizer, LR, precision, accumulation, clipping) beside an
``EpochPlan`` (what the epoch is: its number, start, logging and saves), sums the losses, and owns
everything else. A non-finite loss raises ``NonFiniteLossError`` naming the epoch,
step and loss values *before* the backward pass, so no optimizer step and no checkpoint ever sees it.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from tqdm import tqdm

from engine import distributed as du
from engine.cuda_graph import accumulation_window
from engine.optim import set_lr
from engine.precision import AMP_DTYPES, autocast

__all__ = ['EpochPlan', 'NonFiniteLossError', 'ResumableSampler', 'StepPlan', 'train_one_epoch', 'autocast']


class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or infinite; the run stops before the update."""


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler so one iteration can start part-way (a resumed epoch skips what it already did).

    The skipped indices are never loaded. ``len`` stays the full length so the epoch's step count and
    the LR schedule do not change on resume.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self._skip = 0

    def start_at(self, num_samples: int) -> None:
        self._skip = num_samples

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def _batches_from(loader, start_step: int):
    """Iterator over the loader's batches from ``start_step`` on, skipping in the sampler when possible."""
    if hasattr(loader.dataset, 'start_at_step'):  # a stream that positions its workers itself (data.shards)
        for line in loader.dataset.start_at_step(start_step, max(1, loader.num_workers)):
            if du.is_main_process():
                print(line)
        return iter(loader)
    if start_step == 0:
        return iter(loader)
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.start_at(start_step * loader.batch_size)
        return iter(loader)
    return itertools.islice(iter(loader), start_step, None)


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, float]:
    # one device->host read for all losses (each float() would wait for the device separately)
    read = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).tolist() if losses else []
    values = dict(zip(losses, read))
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f'non-finite loss at epoch {epoch} step {step}: {bad} (all losses: {values}); '
                                 f'stopped before the update')
    return values


@dataclass
class StepPlan:
    """What one training step is: the task's ``step_fn`` and how its losses update the weights.

    ``accum_steps``: batches per optimizer step; ``lr_fn`` receives the optimizer-step index (batch index //
    ``accum_steps``), so a warm-up of N steps spans N updates whatever the accumulation. The last window of an
    epoch that ``accum_steps`` does not divide averages over the batches it has.

    ``updates_itself``: ``step_fn`` runs backward and the optimizer update itself (a step replayed as CUDA graphs,
    ``engine.cuda_graph.TrainStep``, which accumulates, clips and skips the update of a non-finite window on the
    device); the loop sets the LR before it and checks and logs the losses it returns. No fp16 scaler then.
    """
    step_fn: Callable[[torch.nn.Module, object, int], dict]
    optimizer: torch.optim.Optimizer
    lr_fn: Callable[[int], float]
    precision: str = 'none'
    accum_steps: int = 1
    clip_grad: float = 0.0
    scaler: Optional[torch.amp.GradScaler] = None
    updates_itself: bool = False

    def __post_init__(self) -> None:
        if self.precision not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {self.precision!r}")
        if self.accum_steps < 1:
            raise ValueError(f'accum_steps must be >= 1, got {self.accum_steps}')
        if self.updates_itself and self.scaler is not None:
            raise ValueError('a step that updates the weights itself (cuda_graph) takes no fp16 grad scaler')


@dataclass
class EpochPlan:
    """What one epoch is: its number, where it starts, what it logs and when it saves.

    ``save_fn(next_step, totals)`` is called on every rank after each ``save_every_steps``-th optimizer step;
    ``totals`` = ``{'sums': {loss: sum}, 'count': steps}`` of the epoch so far over all ranks (a collective).
    Handed back as ``start_totals`` when the epoch resumes at ``next_step``, they make the returned means
    cover the whole epoch, not only the steps after the resume.

    ``save_at_end``: ``save_fn(steps, totals)`` after the last step too, so that what follows the epoch (its
    evaluation) can fail without losing it.
    """
    epoch: int
    start_step: int = 0
    start_totals: Optional[dict] = None
    logger: Optional[object] = None
    log_every: int = 50
    save_fn: Optional[Callable[[int, dict], None]] = None
    save_every_steps: int = 0
    save_at_end: bool = False


def train_one_epoch(model: torch.nn.Module, loader, plan: StepPlan, ep: EpochPlan, device: torch.device) -> dict:
    """Train one epoch from ``ep.start_step``; return the epoch's mean losses (over ranks) and last LR."""
    optimizer, steps, epoch = plan.optimizer, len(loader), ep.epoch
    model.train()
    sums: dict[str, float] = defaultdict(float)
    window: dict[str, float] = defaultdict(float)
    count = window_count = 0
    if ep.start_totals and du.is_main_process():  # one rank carries them: the totals are summed over ranks
        sums.update(ep.start_totals['sums'])
        count = int(ep.start_totals['count'])
    lr = float(optimizer.param_groups[0]['lr'])
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    bar = tqdm(total=steps, initial=ep.start_step, desc=f'epoch {epoch}', disable=not du.is_main_process(),
               dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.time()
    for step, batch in zip(range(ep.start_step, steps), _batches_from(loader, ep.start_step)):
        lr = plan.lr_fn(step // plan.accum_steps)
        set_lr(optimizer, lr)
        update, window_size = accumulation_window(step, steps, plan.accum_steps)
        sync = model.no_sync() if is_ddp and not update else contextlib.nullcontext()
        with sync:
            with autocast(device, plan.precision):
                losses = plan.step_fn(model, batch, step)
            values = _check_finite(losses, epoch, step)
            if not plan.updates_itself:
                loss = sum(v.float() for v in losses.values()) / window_size
                (plan.scaler.scale(loss) if plan.scaler is not None else loss).backward()
        if update and not plan.updates_itself:
            _optimizer_step(model, optimizer, plan.scaler, plan.clip_grad)
        for k, v in values.items():
            sums[k] += v
            window[k] += v
        count += 1
        window_count += 1
        bar.update(1)
        if du.is_main_process():
            bar.set_postfix({k: f'{v:.3f}' for k, v in values.items()} | {'lr': f'{lr:.2e}'})
        if ep.logger is not None and ((step + 1) % ep.log_every == 0 or step + 1 == steps):
            ep.logger.log({'epoch': epoch, 'step': step + 1, 'steps': steps, 'lr': lr,
                           **{k: v / window_count for k, v in window.items()},
                           'sec_per_step': (time.time() - t0) / window_count})
            window.clear()
            window_count, t0 = 0, time.time()
        if ep.save_fn is not None and ep.save_every_steps and update and (step + 1) % ep.save_every_steps == 0 \
                and step + 1 < steps:
            ep.save_fn(step + 1, _totals_over_ranks(sums, count, device))
    bar.close()
    totals = _totals_over_ranks(sums, count, device)
    if ep.save_fn is not None and ep.save_at_end and ep.start_step < steps:
        ep.save_fn(steps, totals)
    n = max(totals['count'], 1)
    return {'lr': lr, **{k: v / n for k, v in totals['sums'].items()}}


def _totals_over_ranks(sums: dict, count: int, device: torch.device) -> dict:
    keys = sorted(sums)
    if du.get_world_size() > 1:  # the same list on every rank (one may hold restored sums and have run no step)
        gathered = [None] * du.get_world_size()
        torch.distributed.all_gather_object(gathered, keys)
        keys = sorted(set().union(*gathered))
    totals = du.all_reduce_sum([sums[k] for k in keys] + [count], device if device.type == 'cuda' else 'cpu')
    return {'sums': dict(zip(keys, totals[:-1])), 'count': int(totals[-1])}


def _optimizer_step(model, optimizer, scaler, clip_grad: float) -> None:
    if clip_grad > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
