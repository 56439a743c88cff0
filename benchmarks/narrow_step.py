"""Per-operator overhead of a training step: the full-depth model at width 64, timed on the CPU.

A GPU step that is host-bound takes (kernels x host time per kernel), whatever its FLOPs. With the real
depth (12 ViT blocks, 12 MED layers) and a width of 64, the CPU's time per step is mostly the same
per-operator work (Python, dispatcher, autograd), so code changes that remove operators or host work can be
compared here. Attention dropout is switched off by default so that attention is one operator, as on a GPU
(the CPU runs attention with dropout as its math composite).

    python benchmarks/narrow_step.py --threads 2 --iters 15
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from common import maybe_compile, without_attention_dropout  # (also puts the repository on sys.path)
from caption_train import captions

MED = {'hidden_size': 64, 'num_hidden_layers': 12, 'num_attention_heads': 2, 'intermediate_size': 128,
       'vocab_size': 30524, 'max_position_embeddings': 64, 'encoder_width': 64}
VIT = {'embed_dim': 64, 'depth': 12, 'num_heads': 2, 'patch_size': 16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=15)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--attention-dropout', action='store_true', help='keep attention dropout (CPU math attention)')
    p.add_argument('--compile', action='store_true', help='regional torch.compile (models.compile)')
    p.add_argument('--compile-mode', default=None, help="torch.compile mode with --compile (e.g. 'reduce-overhead')")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from models.blip_pretrain import blip_pretrain
    model = blip_pretrain(med_config=dict(MED), image_size=64, vit=dict(VIT),
                          queue_size=64 - 64 % args.batch).train()
    if not args.attention_dropout:
        without_attention_dropout(model)
    maybe_compile(model, args)
    text = [c[len('a picture of '):] for c in captions(args.batch, seed=1)]
    image = torch.randn(args.batch, 3, 64, 64)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, foreach=True)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = sum(model(image, text, alpha=0.4))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    rec = {'workload': 'narrow_pretrain_step', 'batch': args.batch, 'attention_dropout': args.attention_dropout,
           'compile': args.compile, 'compile_mode': args.compile_mode,
           'ms_per_step': round(1000 * statistics.median(times), 1), 'date': time.strftime('%Y-%m-%d')}
    print(json.dumps(rec))
    return rec


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
