"""Shared helpers of the benchmark scripts: arguments, model sizes, timing, memory, FLOPs, MFU, HF twins.

Timing: ``warmup`` untimed iterations, then ``iters`` (>= 10) timed ones, each bracketed by
``torch.cuda.synchronize()`` (host clock) so the device work is complete; we report the median.
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed iterations (reset before them).
FLOPs: one extra iteration under ``torch.utils.flop_counter.FlopCounterMode`` (counts matmuls,
convolutions and attention; elementwise work is not counted, as usual for MFU).
MFU: counted FLOPs per second over the bf16 matmul rate measured on the same device
(``measure_matmul_rate``; an 8192^3 bf16 product on CUDA, smaller on the CPU).

Nothing here downloads anything: every model is built with random weights at the requested size,
and transformers' twin (``--compare-hf``) gets OUR weights through ``models.convert_hf.blip_to_hf``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# 'tiny' exercises every code path on a CPU in seconds; 'base' is the real BLIP size (ViT-B/16 + BERT-base MED).
TINY_VIT = {'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 8}
TINY_MED = {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
            'vocab_size': 30524, 'max_position_embeddings': 64, 'encoder_width': 32}


def parser(description: str, batch: int, image_size: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--amp', default='bf16', choices=['bf16', 'none'], help='bf16 autocast (fp32 losses) or fp32')
    p.add_argument('--size', default='base', choices=['base', 'tiny'])
    p.add_argument('--batch', type=int, default=batch)
    p.add_argument('--image-size', type=int, default=None, help=f'default {image_size} (base) / 32 (tiny)')
    p.add_argument('--iters', type=int, default=10, help='timed iterations (median reported)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--compare-hf', action='store_true',
                   help="also build transformers' BLIP with identical weights, check outputs, time it")
    p.add_argument('--json', default=None, help='append one JSON line per result to this file')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU runs)')
    p.add_argument('--no-flops', action='store_true', help='skip the FlopCounterMode pass')
    p.set_defaults(default_image_size=image_size)
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.image_size is None:
        args.image_size = args.default_image_size if args.size == 'base' else 32
    if args.iters < 10:
        print(f'note: --iters {args.iters} < 10, the issue asks for >= 10 timed iterations', file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the peers' fp32 numbers)
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    return args


def vit_spec(size: str):
    return 'base' if size == 'base' else dict(TINY_VIT)


def med_spec(size: str, config='configs/med_config.json'):
    return str(REPO / config) if size == 'base' else dict(TINY_MED)


def add_step_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of the training-step benchmarks (``pretrain_step.py``, ``caption_train.py``)."""
    p.add_argument('--compile', action='store_true',
                   help='torch.compile each ViT block and MED layer (models.compile; warm-up compiles)')
    p.add_argument('--compile-mode', default=None,
                   help="torch.compile mode with --compile, e.g. 'reduce-overhead' (CUDA graphs per compiled unit) "
                        "or 'max-autotune-no-cudagraphs'; default: torch's default mode")
    p.add_argument('--profile', action='store_true',
                   help='also report kernels per step and device-busy time (is the step host-bound?)')
    return p


def without_attention_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Attention-probability dropout off, so that CPU attention is one fused operator as on a GPU (the CPU
    runs attention with dropout as its math composite); counts and host times then carry to the GPU."""
    from models.med import Attention
    for module in model.modules():
        if isinstance(module, Attention):
            module.dropout_p = 0.0
    return model


def maybe_compile(model: torch.nn.Module, args) -> torch.nn.Module:
    if args.compile:
        from models.compile import compile_layers
        n = compile_layers(model, mode=args.compile_mode)
        print(f'compiled {n} ViT blocks / MED layers (mode {args.compile_mode or "default"})', flush=True)
    return model


def compiled_impl_name(args) -> str:
    """Result label: 'ours', 'ours_compiled', or 'ours_compiled_<mode>' for a non-default compile mode."""
    if not args.compile:
        return 'ours'
    return 'ours_compiled' + (f'_{args.compile_mode}' if args.compile_mode else '')


def autocast(args) -> contextlib.AbstractContextManager:
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp == 'bf16')


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], args, iters: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    """Median (and spread) of ``iters`` synchronised runs of ``fn`` after ``warmup`` runs; peak memory."""
    iters = args.iters if iters is None else iters
    warmup = args.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn()
    sync(args.device)
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    out = {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times), 'iters': iters,
           'warmup': warmup}
    if args.device == 'cuda':
        out['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def count_flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def device_busy(fn: Callable[[], object], args, median_s: float, steps: int = 3) -> dict:
    """Kernels per step and the time the device spends running them (union of kernel intervals, profiler).

    Over ``median_s`` (the unprofiled step time) this says whether a step is host-bound: a device busy for a
    small fraction of the step waits for the host to launch work. CPU runs report the profiled wall time only.
    """
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == 'cuda' else [])
    sync(args.device)  # called after time_fn: already warm
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(args.device)
        wall = time.perf_counter() - t0
    out = {'profiled_ms_per_step': 1e3 * wall / steps}
    if args.device == 'cuda':
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, float('-inf')
        for start, stop in spans:  # union of intervals, in microseconds
            if stop > end:
                busy += stop - max(start, end)
                end = stop
        if not spans:  # profiler builds without device events per kernel: sum of device self times instead
            busy = sum(e.self_device_time_total for e in prof.key_averages())
        out.update(device_kernels_per_step=len(spans) / steps, device_busy_ms_per_step=busy / 1e3 / steps,
                   device_busy_fraction=busy / 1e6 / steps / median_s)
    print('profile:', {k: round(v, 3) for k, v in out.items()}, flush=True)
    return out


_RATE_CACHE: dict = {}


def measure_matmul_rate(device: str) -> float:
    """bf16 matmul FLOP/s on this device (8192^3 on CUDA; 1024^3 on the CPU), median of 10 after warm-up."""
    if device in _RATE_CACHE:
        return _RATE_CACHE[device]
    n = 8192 if device == 'cuda' else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    _RATE_CACHE[device] = 2 * n ** 3 / statistics.median(times)
    return _RATE_CACHE[device]


def environment(device: str) -> dict:
    env = {'torch': torch.__version__, 'python': platform.python_version(), 'machine': platform.machine(),
           'threads': torch.get_num_threads()}
    try:
        import transformers
        env['transformers'] = transformers.__version__
    except ImportError:
        pass
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
    else:
        env['cpu'] = platform.processor() or platform.machine()
    return env


def report(args, workload: str, impl: str, timing: dict, items: int, unit: str = 'img',
           flops: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    """Print and (with --json) append one result: throughput, latency, memory, FLOPs and MFU."""
    rec = {'workload': workload, 'impl': impl, 'device': args.device, 'amp': args.amp, 'size': args.size,
           'batch': args.batch, 'image_size': args.image_size, **timing,
           f'{unit}_per_s': items / timing['median_s'], 'ms': 1e3 * timing['median_s']}
    if flops:
        rec['gflop_per_iter'] = flops / 1e9
        rate = measure_matmul_rate(args.device)
        rec['matmul_bf16_tflops'] = rate / 1e12
        rec['achieved_tflops'] = flops / timing['median_s'] / 1e12
        rec['mfu'] = flops / timing['median_s'] / rate
    if extra:
        rec.update(extra)
    rec['env'] = environment(args.device)
    rec['date'] = time.strftime('%Y-%m-%d')
    line = (f"{workload:<22} {impl:<12} {args.device:<4} amp={args.amp:<4} B={args.batch:<4} "
            f"{rec[f'{unit}_per_s']:9.1f} {unit}/s  {rec['ms']:9.2f} ms")
    if 'peak_mem_gib' in rec:
        line += f"  peak {rec['peak_mem_gib']:.2f} GiB"
    if 'mfu' in rec:
        line += f"  MFU {100 * rec['mfu']:.1f}% ({rec['achieved_tflops']:.0f} TFLOP/s)"
    print(line, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return rec


def check(name: str, ok: bool, detail: str = '') -> None:
    """A parity check before timing; failing ones abort the benchmark (numbers of a wrong model mean nothing)."""
    print(f"check {name}: {'OK' if ok else 'FAILED'} {detail}", flush=True)
    if not ok and not os.environ.get('BENCH_IGNORE_CHECKS'):
        raise SystemExit(f'parity check {name} failed: {detail}')


# ---------------------------------------------------------------------------------------------- HF twins

def hf_config(size: str, image_size: int):
    """transformers' BlipConfig with BLIP's numerics (vision LN eps 1e-6, smoothing 0.1) at our size."""
    from transformers import BlipConfig
    if size == 'base':
        v = {'embed_dim': 768, 'depth': 12, 'num_heads': 12, 'patch_size': 16}
        t = {'hidden_size': 768, 'num_hidden_layers': 12, 'num_attention_heads': 12, 'intermediate_size': 3072,
             'max_position_embeddings': 512}
    else:
        v, t = TINY_VIT, TINY_MED
    return BlipConfig(
        vision_config=dict(hidden_size=v['embed_dim'], intermediate_size=4 * v['embed_dim'],
                           num_hidden_layers=v['depth'], num_attention_heads=v['num_heads'],
                           patch_size=v['patch_size'], image_size=image_size, layer_norm_eps=1e-6,
                           hidden_act='gelu'),
        text_config=dict(hidden_size=t['hidden_size'], intermediate_size=t['intermediate_size'],
                         num_hidden_layers=t['num_hidden_layers'], num_attention_heads=t['num_attention_heads'],
                         vocab_size=30524, max_position_embeddings=t['max_position_embeddings'],
                         layer_norm_eps=1e-12, hidden_act='gelu', label_smoothing=0.1, bos_token_id=30522,
                         sep_token_id=102, pad_token_id=0, encoder_hidden_size=v['embed_dim'],
                         # transformers defaults these to 0; BLIP (and our model) trains with 0.1
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


def hf_twin(ours: torch.nn.Module, kind: str, size: str, image_size: int):
    """transformers' ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` holding ``ours``' weights."""
    import transformers
    from models.convert_hf import blip_to_hf
    cls = {'caption': transformers.BlipForConditionalGeneration,
           'retrieval': transformers.BlipForImageTextRetrieval}[kind]
    hf = cls(hf_config(size, image_size))
    sd = blip_to_hf(ours.state_dict(), kind)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # HF's classes carry no persistent position_ids; anything else missing would mean different weights
    missing = [k for k in missing if not k.endswith('position_ids')]
    if missing or unexpected:
        raise RuntimeError(f'HF twin does not hold our weights: missing {missing[:5]} unexpected {unexpected[:5]}')
    return hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
