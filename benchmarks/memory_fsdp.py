"""Per-GPU memory of a training step under ``parallel: ddp`` and ``parallel: fsdp`` for 1, 8, 32 ... ranks,
measured in ONE process: a fake process group (``torch.distributed`` backend ``fake``: collectives do nothing)
makes this process rank 0 of N, so FSDP2 really allocates 1/N shards, gathers whole units into real buffers and
keeps 1/N of the gradients and AdamW moments; DDP really allocates its gradient buckets. The numbers (losses)
are garbage -- gathered weights are whatever the buffers held -- but every allocation is the real one.

Workloads (issue 24): ViT-L pretraining (B=64 @224, queue 57600, ITC+ITM+LM, momentum encoders) and ViT-L
caption training (B=32 @384), both with the ViT's activation checkpointing (``--ckpt-layer`` last blocks).
Reported per configuration: bytes per rank of parameters / gradients / optimizer state / buffers (from the
tensors themselves, after a step: exact on any device), bytes per trainable parameter, and on CUDA the peak
``max_memory_allocated`` of the step. Each configuration runs in its own subprocess (a clean allocator).

    python benchmarks/memory_fsdp.py --device cuda --size large --worlds 1 8 32     # ~2-3 min on an H100/H200
    python benchmarks/memory_fsdp.py --device cpu --size tiny --worlds 1 8          # accounting only, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common import TINY_MED, TINY_VIT  # noqa: E402

WORKLOADS = {  # batch, image size at --size large / base (tiny: 4 @ 32)
    'pretrain': (64, 224),
    'caption': (32, 384),
}


def build(workload: str, size: str, ckpt_layer: int, queue: int):
    from models.blip import blip_decoder
    from models.blip_pretrain import blip_pretrain
    vit = dict(TINY_VIT) if size == 'tiny' else size
    med = dict(TINY_MED) if size == 'tiny' else str(REPO / 'configs/med_config.json')
    image = 32 if size == 'tiny' else WORKLOADS[workload][1]
    ckpt = {'vit_grad_ckpt': ckpt_layer > 0, 'vit_ckpt_layer': ckpt_layer}
    if workload == 'pretrain':
        model = blip_pretrain(image_size=image, vit=vit, queue_size=queue,
                              med_config=str(REPO / 'configs/bert_config.json') if size != 'tiny' else med, **ckpt)
        # gathered garbage weights can give NaN similarities: a NaN-proof sampler keeps the step running
        from models.losses import sample_negatives
        model.negative_sampler = lambda w, *a, **k: sample_negatives(torch.nan_to_num(w, 1.0, 1.0, 0.0).clamp_min(0),
                                                                     *a, **k)
    else:
        model = blip_decoder(image_size=image, vit=vit, med_config=med, **ckpt)
    return model, image


class _OptimConfig(dict):
    init_lr = 1e-5

    def __init__(self):
        super().__init__(weight_decay=0.05)


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, 'to_local') else t
        total += t.numel() * t.element_size()
    return total


def measure(args) -> dict:
    """One configuration, in this process: rank 0 of a fake group of ``args.world`` ranks."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from engine import parallel
    from engine.optim import create_optimizer
    device = torch.device(args.device)
    if args.world > 1:
        dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=args.world)
    torch.manual_seed(0)
    queue = args.queue - args.queue % (args.batch * args.world) if args.workload == 'pretrain' else 0
    with torch.device(device):  # initialised where it trains: a ViT-L BLIP's random init on one CPU core is slow
        model, image_size = build(args.workload, args.size, args.ckpt_layer, max(queue, args.batch * args.world))
    model = model.to(device).train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    precision = 'bf16' if device.type == 'cuda' else 'none'
    wrapped = parallel.wrap(model, args.mode, device, precision) if args.world > 1 else model
    optimizer = create_optimizer(wrapped, _OptimConfig())  # the runner's AdamW (fused on CUDA)
    image = torch.randn(args.batch, 3, image_size, image_size, device=device)
    captions = [f'a picture of a dog number {i} running on the grass' for i in range(args.batch)]
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            out = wrapped(image, captions, alpha=0.4) if args.workload == 'pretrain' else wrapped(image, captions)
            loss = sum(out) if isinstance(out, (tuple, list)) else out
        loss.float().backward()
        optimizer.step()
        # the gradients are kept (set_to_none=False) so that the accounting below sees them; their memory is
        # in the peak either way (they exist at the end of every backward)
        optimizer.zero_grad(set_to_none=False)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = [p for p in wrapped.parameters()]
    result = {
        'workload': f'{args.workload}_memory', 'size': args.size, 'mode': args.mode, 'world': args.world,
        'batch_per_rank': args.batch, 'image_size': image_size, 'queue_size': queue if args.workload == 'pretrain'
        else None, 'vit_ckpt_layer': args.ckpt_layer, 'device': torch.cuda.get_device_name() if device.type == 'cuda'
        else 'cpu', 'precision': precision,
        'trainable_params': n_trainable, 'frozen_params': n_frozen,
        'param_bytes': local_bytes(params),
        'grad_bytes': local_bytes([p.grad for p in params if p.grad is not None]),
        'optimizer_bytes': local_bytes([v for s in optimizer.state.values() for v in s.values()
                                        if torch.is_tensor(v) and v.dim() > 0]),
        'buffer_bytes': local_bytes(list(wrapped.buffers())),
        'step_s': sorted(times)[len(times) // 2] if times else None,
    }
    static = result['param_bytes'] + result['grad_bytes'] + result['optimizer_bytes']
    result['static_bytes_per_trainable_param'] = round(static / n_trainable, 3)
    if args.mode == 'ddp':
        result['ddp_bucket_bytes'] = 4 * n_trainable
    if device.type == 'cuda':
        result['peak_gib'] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        result['static_gib'] = round((static + result['buffer_bytes']) / 2 ** 30, 2)
        if args.mode == 'ddp':
            result['peak_gib_with_ddp_buckets'] = round(result['peak_gib'] + 4 * n_trainable / 2 ** 30, 2)
    if args.world > 1:
        dist.destroy_process_group()
    return result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--size', default='large', choices=['large', 'base', 'tiny'])
    p.add_argument('--workloads', nargs='+', default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument('--modes', nargs='+', default=['ddp', 'fsdp'], choices=['ddp', 'fsdp'])
    p.add_argument('--worlds', nargs='+', type=int, default=[8, 32], help='simulated ranks of FSDP')
    p.add_argument('--batch', type=int, default=None, help='per rank; default 64 (pretrain) / 32 (caption), tiny 4')
    p.add_argument('--queue', type=int, default=57600)
    p.add_argument('--ckpt-layer', type=int, default=None,
                   help='last ViT blocks checkpointed; default half the depth (12 for large, as README)')
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--timeout', type=int, default=300, help='seconds per configuration')
    p.add_argument('--json', default=None, help='append results as JSON lines')
    p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)  # a single configuration (subprocess)
    p.add_argument('--workload', default=None, help=argparse.SUPPRESS)
    p.add_argument('--mode', default=None, help=argparse.SUPPRESS)
    p.add_argument('--world', type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print('RESULT ' + json.dumps(measure(args)), flush=True)
        return []
    results = []
    depth = {'large': 24, 'base': 12, 'tiny': 2}[args.size]
    for workload in args.workloads:
        batch = args.batch or (4 if args.size == 'tiny' else WORKLOADS[workload][0])
        for mode in args.modes:
            # DDP keeps everything on every rank whatever their number; its reducer cannot run on the fake group,
            # so it is measured as one process, plus its gradient buckets (4 bytes per trainable parameter)
            for world in ([1] if mode == 'ddp' else args.worlds):
                cmd = [sys.executable, __file__, '--one', '--device', args.device, '--size', args.size,
                       '--workload', workload, '--mode', mode, '--world', str(world), '--batch', str(batch),
                       '--queue', str(args.queue), '--steps', str(args.steps),
                       '--ckpt-layer', str(depth // 2 if args.ckpt_layer is None else args.ckpt_layer)]
                env = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1'}
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
                    result = json.loads(lines[-1][7:]) if lines else \
                        {'failed': f'{workload} {mode} x{world}', 'error': proc.stderr[-1500:]}
                except subprocess.TimeoutExpired:
                    result = {'failed': f'{workload} {mode} x{world}', 'error': f'timeout {args.timeout} s'}
                print(json.dumps(result), flush=True)
                results.append(result)
                if args.json:
                    with open(args.json, 'a') as f:
                        f.write(json.dumps(result) + '\n')
    return results


if __name__ == '__main__':
    main()
