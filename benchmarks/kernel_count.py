"""Operator (kernel) launches per decode step and per training step: a device-independent count.

Eager decoding on a GPU is bound by the host: each step's time is roughly its number of kernel launches
times the launch cost, not its FLOPs. Every operator PyTorch dispatches to a device kernel is counted here
(``TorchDispatchMode``, below autograd, so the backward pass is counted too); views, allocations and
metadata operators launch nothing and are left out. The same model code dispatches the same operators on a
CPU and a GPU, apart from attention (one fused operator on both) and the CPU-only skinny linear kernels
(one operator either way), so a change that removes launches can be counted on the CPU.

    python benchmarks/kernel_count.py --device cpu --size base --workload decode --batch 1
    python benchmarks/kernel_count.py --device cpu --size base --workload caption --batch 2
"""
from __future__ import annotations

import collections
import json
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import autocast, environment, finish_args, med_spec, parser, vit_spec, without_attention_dropout

# operators that run no kernel: tensor metadata, allocation, autograd bookkeeping
_NO_KERNEL = {'detach', 'alias', '_unsafe_view', 'lift_fresh', 'empty', 'empty_like', 'empty_strided', 'new_empty',
              'new_empty_strided', 'set_', 'resize_', '_local_scalar_dense', 'is_same_size', 'sym_size',
              'sym_stride', 'sym_numel', 'sym_storage_offset', 'dim', 'size', 'stride'}


class CountKernels(TorchDispatchMode):
    """Records the name of every dispatched operator that launches device work."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_KERNEL):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def top(ops: list, n: int = 8) -> dict:
    return dict(collections.Counter(ops).most_common(n))


def decode_counts(args) -> dict:
    """Kernels per beam-search step of caption generation (after the prompt step), split into decoder
    forward and beam bookkeeping."""
    import models.generation as generation
    from models.blip import blip_decoder
    model = blip_decoder(med_config=med_spec(args.size), image_size=args.image_size, vit=vit_spec(args.size))
    model = model.to(args.device).eval()
    image = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    starts, ends = [], []
    counter = CountKernels()
    original = generation._Decoder.logits

    def logits(self, input_ids):
        starts.append(len(counter.ops))
        out = original(self, input_ids)
        ends.append(len(counter.ops))
        return out

    generation._Decoder.logits = logits
    try:
        with torch.no_grad(), autocast(args), counter:
            model.generate(image, sample=False, num_beams=3, max_length=20, min_length=20)  # every step runs
    finally:
        generation._Decoder.logits = original
    # step i: from the start of logits call i to the start of call i+1 (its decoder forward + bookkeeping);
    # the prompt step (i = 0, with the ViT before it) and the last step are left out
    total = [starts[i + 1] - starts[i] for i in range(1, len(starts) - 1)]
    forward = [ends[i] - starts[i] for i in range(1, len(starts) - 1)]
    step_ops = counter.ops[starts[1]:starts[2]]
    return {'steps': len(starts), 'kernels_per_step': statistics.median(total),
            'decoder_forward_kernels': statistics.median(forward),
            'bookkeeping_kernels': statistics.median(t - f for t, f in zip(total, forward)),
            'matmuls_per_step': sum(op in ('mm', 'addmm', 'bmm', 'linear', '_linear_pointwise') for op in step_ops),
            'top_ops_per_step': top(step_ops)}


def train_counts(args) -> dict:
    """Kernels of one training step's forward and backward (optimizer step not included)."""
    from saved_activations import build
    model, forward = build(args)
    model.to(args.device).train()
    if args.no_attention_dropout:
        without_attention_dropout(model)
    counter = CountKernels()
    with counter:
        with autocast(args):
            loss = forward()
        n_forward = len(counter.ops)
        loss.backward()
    return {'forward_kernels': n_forward, 'backward_kernels': len(counter.ops) - n_forward,
            'kernels_per_step': len(counter.ops),
            'matmuls_per_step': sum(op in ('mm', 'addmm', 'bmm', 'linear') for op in counter.ops),
            'top_ops_per_step': top(counter.ops)}


def main(argv=None):
    p = parser('kernel launches per decode step / training step (device-independent)', batch=1, image_size=0)
    p.add_argument('--workload', choices=['decode', 'caption', 'pretrain', 'retrieval'], default='decode')
    p.add_argument('--no-attention-dropout', action='store_true',
                   help='training counts with attention as one fused operator, as on a GPU (CPU runs)')
    p.add_argument('--label', default='', help='free text stored with the result (e.g. the git revision)')
    args = p.parse_args(argv)
    args.default_image_size = 224 if args.workload == 'pretrain' else 384
    args = finish_args(args)
    counts = decode_counts(args) if args.workload == 'decode' else train_counts(args)
    rec = {'workload': f'{args.workload}_kernel_count', 'label': args.label,
           'attention_dropout': not args.no_attention_dropout, 'device': args.device,
           'amp': args.amp, 'size': args.size, 'batch': args.batch, 'image_size': args.image_size, **counts,
           'env': environment(args.device), 'date': time.strftime('%Y-%m-%d')}
    print(json.dumps({k: v for k, v in rec.items() if k != 'env'}))
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return rec


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
