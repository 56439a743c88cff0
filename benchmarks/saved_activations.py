"""What one training forward keeps for the backward pass, and the work of forward + backward, per image.

Device-independent counts, so they can be measured on the CPU: the bytes of the tensors autograd saves
(unique storages, parameters excluded; bf16 autocast as on the GPU) and the FLOPs counted by
``FlopCounterMode``. Activation memory is most of a training step's peak beyond weights and optimizer state,
and counted FLOPs are the work a GPU has to do, so a change that lowers either shows up here first.
The attention kernels differ by device (the CPU keeps more per attention call than flash attention), so
compare two runs on the same device, and read absolute bytes as an upper bound for the GPU.

    python benchmarks/saved_activations.py --device cpu --threads 2 --workload pretrain --batch 8
"""
from __future__ import annotations

import json
import sys
import time

import torch

from caption_train import captions
from common import autocast, count_flops, environment, finish_args, med_spec, parser, vit_spec


def build(args):
    """(model, forward) for the workload at the benchmark sizes of issue 7."""
    dev = args.device
    caps = captions(args.batch, seed=1)
    image = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
    if args.workload == 'pretrain':
        from models.blip_pretrain import blip_pretrain
        model = blip_pretrain(med_config=med_spec(args.size, 'configs/bert_config.json'), image_size=args.image_size,
                              vit=vit_spec(args.size), queue_size=64 - 64 % args.batch)
        text = [c[len('a picture of '):] for c in caps]
        return model, lambda: sum(model(image, text, alpha=0.4))
    if args.workload == 'retrieval':
        from models.blip_retrieval import blip_retrieval
        model = blip_retrieval(med_config=med_spec(args.size), image_size=args.image_size, vit=vit_spec(args.size),
                               queue_size=64 - 64 % args.batch)
        text = [c[len('a picture of '):] for c in caps]
        idx = torch.arange(args.batch, device=dev)
        return model, lambda: sum(model(image, text, alpha=0.4, idx=idx))
    from models.blip import blip_decoder
    model = blip_decoder(med_config=med_spec(args.size), image_size=args.image_size, vit=vit_spec(args.size))
    return model, lambda: model(image, caps)


def saved_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the distinct storages autograd saves during ``forward()`` (parameters not counted)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in params)


def main(argv=None):
    p = parser('saved-for-backward bytes and fwd+bwd FLOPs of one training forward', batch=8, image_size=0)
    p.add_argument('--workload', choices=['pretrain', 'retrieval', 'caption'], default='pretrain')
    args = p.parse_args(argv)
    args.default_image_size = 224 if args.workload == 'pretrain' else 384
    args = finish_args(args)
    model, forward = build(args)
    model.to(args.device).train()
    with autocast(args):
        saved = saved_bytes(model, forward)

    def step():
        with autocast(args):
            loss = forward()
        loss.backward()

    flops = None if args.no_flops else count_flops(step)
    rec = {'workload': f'{args.workload}_saved_activations', 'device': args.device, 'amp': args.amp,
           'size': args.size, 'batch': args.batch, 'image_size': args.image_size,
           'saved_mib_per_image': saved / args.batch / 2 ** 20, 'saved_gib': saved / 2 ** 30,
           'gflop_per_image': flops / args.batch / 1e9 if flops else None, 'env': environment(args.device)}
    print(f"{rec['workload']:<30} B={args.batch} amp={args.amp}: saved for backward {rec['saved_mib_per_image']:.1f} "
          f"MiB/img ({rec['saved_gib']:.2f} GiB)" + (f", {rec['gflop_per_image']:.1f} GFLOP/img fwd+bwd" if flops else ''))
    if args.json:
        rec['date'] = time.strftime('%Y-%m-%d')
        with open(args.json, 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return rec


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
