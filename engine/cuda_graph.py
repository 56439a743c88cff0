"""A whole training step (forward, backward, optimizer update) recorded once as a CUDA graph and replayed.

On a fast GPU an eager BLIP training step is bound by host work, not by the device: the pretraining step
launches ~5200 kernels, and Python, autograd and the dispatcher spend ~30 us on each (BENCHMARKS.md). A CUDA
graph launches all of them in one call. What this asks of the step:

* every per-batch value comes from the tensors handed to ``GraphedStep`` (static buffers, refilled before each
  replay): images, token ids, masks, and scalars such as the distillation weight as 0-dim tensors; a Python
  number read inside the step is frozen at capture;
* fixed shapes (captions padded to a fixed length, full batches), and no device value read on the host
  (``.item()``, boolean indexing; ``BLIP_Pretrain.losses`` has none while a graph is recorded);
* an optimizer that keeps its step count and learning rate on the device: fused AdamW with
  ``capturable=True`` and a tensor ``lr`` (``engine.optim.set_lr`` fills it in place);
* gradients synchronised outside the graph: ``TrainStep`` keeps them in one flat buffer, averaged over the ranks
  by a single all-reduce between its two recorded parts (forward + backward, then clipping + update), so no DDP
  hook runs inside a graph.

The first ``warmup`` calls run eagerly (on a side stream, which the capture needs: lazily created state such as
cuBLAS workspaces must exist before recording); the next call records the graph and replays it; later calls
only copy their inputs and replay. Without CUDA (``graph=False``) every call runs the step eagerly on the same
static buffers and gradient protocol: the CPU tests use this.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ['GraphedStep', 'TrainStep', 'accumulation_window', 'decoding_note', 'graphed_step_fn', 'guarded_update',
           'static_text_length', 'training_step']


def guarded_update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, found_inf: Optional[torch.Tensor] = None
                   ) -> None:
    """``optimizer.step()``, skipped on the device when ``loss`` is not finite.

    The eager loop reads the loss on the host and stops before the update; a graph cannot branch on a device
    value, so the decision goes to the fused optimizer kernel through its ``found_inf`` input (the mechanism
    ``GradScaler`` uses): the weights, moments and step count stay as they were, and the caller raises after
    reading the loss.
    """
    if not getattr(optimizer, '_step_supports_amp_scaling', False):
        raise TypeError(f'guarded_update needs an optimizer with a found_inf input (fused AdamW/Adam/SGD), '
                        f'got {type(optimizer).__name__} with defaults {optimizer.defaults}')
    optimizer.found_inf = (~torch.isfinite(loss.detach().float())).float() if found_inf is None else found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def training_step(losses: Callable[..., dict], optimizer: torch.optim.Optimizer) -> Callable[..., dict]:
    """A ``GraphedStep`` body from ``losses(**inputs) -> {name: scalar loss}``: backward of their (fp32) sum,
    then ``guarded_update``; returns the detached losses."""
    def step(**inputs: torch.Tensor) -> dict:
        named = losses(**inputs)
        total = sum(v.float() for v in named.values())
        total.backward()
        guarded_update(optimizer, total)
        return {k: v.detach() for k, v in named.items()}
    return step


class GraphedStep:
    """``step(**static) -> {name: tensor}`` captured as one CUDA graph after ``warmup`` eager calls.

    Args:
        step: the training step; it reads its inputs from the keyword tensors it is given (always the same
            buffers), runs backward and the optimizer update itself (e.g. ``guarded_update``), and returns
            detached output tensors. Gradients are cleared before each eager call and before the capture;
            a replay writes them afresh, as the recorded backward did.
        optimizer: the optimizer ``step`` updates (its gradients are cleared as above); None: gradients are the
            step's own business (``TrainStep`` accumulates into buffers that must stay where they are).
        warmup: eager calls before the capture (>= 1; DDP-free PyTorch needs a few to settle lazy state).
        graph: record a CUDA graph (default: when the first inputs are CUDA tensors).

    Calling it copies the inputs into the static buffers (same keys, shapes and dtypes every call) and
    returns the step's outputs; after the capture these are the graph's own tensors, overwritten by the next
    replay (clone what must be kept).
    """

    def __init__(self, step: Callable[..., dict], optimizer: Optional[torch.optim.Optimizer], warmup: int = 3,
                 graph: Optional[bool] = None):
        if warmup < 1:
            raise ValueError(f'warmup must be >= 1 eager call before the capture, got {warmup}')
        self.step, self.optimizer, self.warmup, self.graph_enabled = step, optimizer, warmup, graph
        self.static: Optional[dict[str, torch.Tensor]] = None
        self.outputs: Optional[dict] = None
        self.graph: Optional['torch.cuda.CUDAGraph'] = None
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, **inputs: torch.Tensor) -> dict:
        self._fill(inputs)
        if not self.graph_enabled or self.calls < self.warmup:
            out = self._eager()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.outputs
        self.calls += 1
        return out

    def _fill(self, inputs: dict) -> None:
        if self.static is None:
            bad = [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f'GraphedStep inputs must be tensors (a Python value would be frozen at capture): {bad}')
            self.static = {k: v.detach().clone() for k, v in inputs.items()}
            if self.graph_enabled is None:
                self.graph_enabled = all(v.is_cuda for v in self.static.values())
            return
        if inputs.keys() != self.static.keys():
            raise ValueError(f'GraphedStep was built for inputs {sorted(self.static)}, got {sorted(inputs)}')
        for k, v in inputs.items():
            own = self.static[k]
            if not isinstance(v, torch.Tensor) or v.shape != own.shape or v.dtype != own.dtype:
                got = f'{tuple(v.shape)} {v.dtype}' if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f'GraphedStep input {k!r}: {got}, but the step was built for '
                                 f'{tuple(own.shape)} {own.dtype} (a graph replays fixed shapes: pad the batch)')
            own.copy_(v, non_blocking=True)

    def _zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _eager(self) -> dict:
        self._zero_grad()
        if not self.graph_enabled:
            return self.step(**self.static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(**self.static)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> None:
        self._zero_grad()  # the recorded backward then writes the gradients, not adds
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's pin-memory thread may call CUDA while the step is recorded
        with torch.cuda.graph(graph, capture_error_mode='thread_local'):
            self.outputs = self.step(**self.static)
        self.graph = graph


def graphed_step_fn(losses: Callable[..., dict], optimizer: torch.optim.Optimizer, config, sync_grads: bool,
                    inputs_of: Callable) -> Callable:
    """A ``Run.train_epoch`` step function replaying ``losses`` as a ``TrainStep`` (the ``cuda_graph`` key).

    ``inputs_of(batch, ctx) -> {name: tensor on the device}`` turns a loader batch into the fixed-shape inputs of
    ``losses``; the config's ``accum_steps`` and ``clip_grad`` are applied inside the step."""
    step = TrainStep(losses, optimizer, accum_steps=config.accum_steps, clip_grad=config.clip_grad,
                     sync_grads=sync_grads)

    def step_fn(_, batch, ctx) -> dict:
        update, window = accumulation_window(ctx.step, ctx.steps_per_epoch, config.accum_steps)
        return step(update, window, **inputs_of(batch, ctx))
    step_fn.train_step = step
    return step_fn


def static_text_length(tokenizer, texts: Sequence[str], limit: int, multiple: int = 8, chunk: int = 4096) -> int:
    """The fixed token length for a captured step whose eager original pads text to the batch's longest: the
    longest of ``texts`` (every text the training set can give) rounded up to ``multiple``, at most ``limit``
    (the text encoder's positions). Padding to it masks the same positions, so the loss is the eager one, and no
    text is ever cut. One tokenizer pass over the set (about 6 s for NLVR2's 86k sentences on one core)."""
    longest = 1
    texts = list(texts)
    for start in range(0, len(texts), chunk):
        ids = tokenizer(texts[start:start + chunk], padding=False, truncation=False)['input_ids']
        longest = max([longest, *map(len, ids)])
    return min(-(-longest // multiple) * multiple, max(limit, longest))


def decoding_note(value: Optional[bool], device: torch.device) -> str:
    """The log line saying whether caption decoding replays CUDA graphs (the ``cuda_graph`` key; empty = auto)."""
    on = device.type == 'cuda' if value is None else value
    why = ('set in the config' if value is not None else
           'auto: a CUDA device' if on else 'auto: no CUDA device')
    return f'cuda_graph: caption decoding {"replays one CUDA graph per step" if on else "runs eagerly"} ({why})'


def accumulation_window(step: int, steps: int, accum_steps: int) -> tuple[bool, int]:
    """``(update, window_size)`` of batch ``step`` of an epoch of ``steps`` batches: whether the optimizer steps
    after it, and how many batches its gradient window averages (the last window of an epoch that
    ``accum_steps`` does not divide has fewer)."""
    last_window = steps - steps % accum_steps  # first batch of a short last window (== steps if none)
    update = (step + 1) % accum_steps == 0 or step + 1 == steps
    return update, accum_steps if step < last_window else steps - last_window


class TrainStep:
    """A training step in two recorded parts, for accumulation, clipping and several processes.

    ``micro(**inputs)`` runs ``losses(**inputs)``, and the backward of their (fp32) sum times ``1 / window``
    into gradients that live in one flat buffer (each parameter's ``.grad`` is a view of it, so a replayed
    backward adds into the same memory); ``update`` then averages the buffer over the ranks with one
    all-reduce (outside any graph), clips its norm on the device (``clip_grad`` > 0), and runs the optimizer
    guarded by ``found_inf`` (any non-finite loss of the window skips the update on the device), and zeroes the
    buffer. Each part is a ``GraphedStep``: eager for its first ``warmup`` calls, then one replayed graph.
    Without CUDA both parts run eagerly on the same buffers (the CPU tests).

    Same arithmetic as the eager loop with DDP: gradients summed over the window's batches, each scaled by
    ``1 / window``, averaged over ranks, clipped, stepped. One difference: a parameter that gets no gradient
    in a window is stepped with a zero gradient (weight decay applies) where the eager loop skips it; every
    parameter of the BLIP models gets one in every training step.

    Args:
        losses: ``losses(**inputs) -> {name: scalar loss}``; reads only the tensors it is given.
        optimizer: a fused optimizer with a ``found_inf`` input (``capturable=True`` for a CUDA graph).
        accum_steps, clip_grad: as the config keys.
        sync_grads: average the gradients over the process group's ranks (several processes, no DDP wrapper).
        warmup, graph: as ``GraphedStep``.
    """

    def __init__(self, losses: Callable[..., dict], optimizer: torch.optim.Optimizer, *, accum_steps: int = 1,
                 clip_grad: float = 0.0, sync_grads: bool = False, warmup: int = 3, graph: Optional[bool] = None):
        if accum_steps < 1:
            raise ValueError(f'accum_steps must be >= 1, got {accum_steps}')
        self.losses, self.optimizer, self.clip_grad, self.sync_grads = losses, optimizer, clip_grad, sync_grads
        self.accum_steps = accum_steps
        self.params = [p for group in optimizer.param_groups for p in group['params']]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f'TrainStep keeps one flat gradient buffer: parameters of one dtype, got {dtypes}')
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.nonfinite = torch.zeros((), device=first.device)
        graph = first.is_cuda if graph is None else graph
        self.micro = GraphedStep(self._micro, None, warmup, graph)
        self.update = GraphedStep(self._update, None, warmup, graph)

    def __call__(self, update: bool = True, window: int = 1, **inputs: torch.Tensor) -> dict:
        """One batch: forward + backward (scaled by ``1 / window``), then, when ``update``, the optimizer step."""
        self._attach_grads()
        out = self.micro(scale=torch.full((), 1.0 / window, device=self.flat.device), **inputs)
        if update:
            if self.sync_grads and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(self.flat)
                self.flat.div_(torch.distributed.get_world_size())
            self.update()
        return out

    @property
    def captured(self) -> bool:
        return self.micro.captured and self.update.captured

    def _attach_grads(self) -> None:
        # the grads must be the buffer's views (a recorded backward adds into their memory); something that set
        # them to None (``zero_grad(set_to_none=True)``) or replaced them gets the views back, zeroed
        if any(p.grad is not v for p, v in zip(self.params, self.views)):
            self.flat.zero_()
            for p, v in zip(self.params, self.views):
                p.grad = v

    def _micro(self, scale: torch.Tensor, **inputs: torch.Tensor) -> dict:
        named = self.losses(**inputs)
        total = sum(v.float() for v in named.values())
        (total * scale).backward()
        self.nonfinite.add_((~torch.isfinite(total.detach())).float())
        return {k: v.detach() for k, v in named.items()}

    def _update(self) -> dict:
        if self.clip_grad > 0:  # foreach norm and scale: computed and applied on the device, no host read
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
        guarded_update(self.optimizer, self.nonfinite, found_inf=(self.nonfinite > 0).float())
        self.flat.zero_()
        self.nonfinite.zero_()
        return {}
