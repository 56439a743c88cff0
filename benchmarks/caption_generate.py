"""Caption generation (BLIP_Decoder.generate): beam 3, max_length 20, min_length 5 (the COCO caption config).

Issue 7 workload: batch 32 and batch 1 @384, base size. Peers (H100, batch 32): original 30 img/s fp32;
transformers 67-80 img/s fp32, 76-109 bf16. Targets: >= 10x the original and >= 3x transformers bf16, at
batch 32 and at batch 1. CPU target (2 cores): >= 1.5x transformers with the same weights.

Timed: ViT forward + decoding to token ids (no detokenisation) for both implementations.
With --compare-hf the tokens are checked first: greedy must be identical; beam search must be identical
where transformers 5's beam bookkeeping agrees with 4.15's (the original's; see tests/test_parity_hf.py):
rows where a finished hypothesis competes may legitimately differ, and are counted, not hidden.

    python benchmarks/caption_generate.py --device cuda --amp bf16 --batches 32,1 --compare-hf
    python benchmarks/caption_generate.py --device cpu --threads 2 --amp none --batches 2 --compare-hf
"""
from __future__ import annotations

import statistics
import time

import torch

from common import (autocast, check, count_flops, finish_args, hf_twin, med_spec, parser, report, sync, time_fn,
                    vit_spec)
from models import generation, med
from models.blip import BLIP_Decoder

SEP, PAD = 102, 0


def up_to_sep(rows, prompt_len: int = 4) -> list[list[int]]:
    out = []
    for r in rows.tolist():
        if SEP in r[prompt_len:]:
            r = r[:prompt_len + r[prompt_len:].index(SEP) + 1]
        while r and r[-1] == PAD:
            r.pop()
        out.append(r)
    return out


def plain_linear(fn):
    """``fn`` run with every MED linear layer as ``F.linear`` (the skinny CPU kernels off)."""
    def run(**kw):
        saved = med.skinny_cpu_linear
        med.skinny_cpu_linear = lambda *a: None
        try:
            return fn(**kw)
        finally:
            med.skinny_cpu_linear = saved
    return run


def main(argv=None):
    p = parser('BLIP caption generation (beam search)', batch=32, image_size=384)
    p.add_argument('--batches', default=None, help='comma-separated batch sizes (default: --batch)')
    p.add_argument('--num-beams', type=int, default=3)
    p.add_argument('--max-length', type=int, default=20)
    p.add_argument('--min-length', type=int, default=5)
    p.add_argument('--interleave', action='store_true', help='alternate ours/transformers runs (shared CPUs)')
    p.add_argument('--plain-linear', action='store_true',
                   help='with --interleave, also time ours with every linear layer as x @ W^T (no skinny CPU path)')
    p.add_argument('--hf-iters', type=int, default=None, help='timed iterations for transformers (default --iters)')
    p.add_argument('--cuda-graph', action='store_true',
                   help='with --interleave, also time ours with cuda_graph=True (same-run eager / graph / transformers)')
    args = finish_args(p.parse_args(argv))
    dev = args.device
    model = BLIP_Decoder(med_config=med_spec(args.size), image_size=args.image_size, vit=vit_spec(args.size))
    model = model.to(dev).eval()
    hf = hf_twin(model, 'caption', args.size, args.image_size).to(dev).eval() if args.compare_hf else None
    gen_kw = dict(num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length)
    batches = [int(b) for b in args.batches.split(',')] if args.batches else [args.batch]
    results = []
    for B in batches:
        args.batch = B
        image = torch.randn(B, 3, args.image_size, args.image_size, device=dev,
                            generator=torch.Generator(dev).manual_seed(B))
        prompt = model.prompt_ids(B, dev)                                        # [DEC] a picture of
        hf_prompt = torch.cat([prompt, torch.full((B, 1), SEP, device=dev)], 1)  # HF drops the last token

        @torch.no_grad()
        def ours(**kw):
            with autocast(args):
                return generation.generate(model.text_decoder, prompt, model.visual_encoder(image), None,
                                           eos_token_id=SEP, pad_token_id=PAD, **(kw or gen_kw))

        @torch.no_grad()
        def theirs(**kw):
            with autocast(args):
                return hf.generate(pixel_values=image, input_ids=hf_prompt.clone(), do_sample=False, **(kw or gen_kw))

        if hf is not None:
            greedy = dict(num_beams=1, max_length=args.max_length, min_length=args.min_length)
            a, b = up_to_sep(ours(**greedy)), up_to_sep(theirs(**greedy))
            same = sum(x == y for x, y in zip(a, b))
            check(f'greedy tokens == transformers (B={B}, amp={args.amp})', same == B or args.amp != 'none',
                  f'{same}/{B} rows identical')
            a, b = up_to_sep(ours()), up_to_sep(theirs())
            same_beam = sum(x == y for x, y in zip(a, b))
            print(f'beam tokens == transformers: {same_beam}/{B} rows (differences allowed only where HF 5 '
                  f'bookkeeping differs from 4.15, see tests/test_parity_hf.py)', flush=True)
        out = ours()
        new_tokens = int((out[:, 4:] != PAD).sum())
        flops = None if args.no_flops else count_flops(ours)
        extra = {'num_beams': args.num_beams, 'max_length': args.max_length, 'min_length': args.min_length,
                 'generated_tokens': new_tokens}
        if hf is not None:
            extra.update(greedy_rows_equal=same, beam_rows_equal=same_beam)
        if hf is not None and args.interleave:
            # shared CPU: alternate the implementations so that load drift hits all alike
            impls = {'ours': ours, 'transformers': theirs}
            if args.plain_linear:
                impls['ours_plain_linear'] = plain_linear(ours)
            if args.cuda_graph:
                graphed = lambda: ours(**gen_kw, cuda_graph=True)  # noqa: E731
                same_graph = sum(x == y for x, y in zip(up_to_sep(graphed()), up_to_sep(ours())))
                print(f'cuda_graph tokens == eager: {same_graph}/{B} rows', flush=True)
                extra = {**extra, 'cuda_graph_rows_equal_eager': same_graph}
                impls['ours_cudagraph'] = graphed
            times = {name: [] for name in impls}
            for _ in range(args.warmup):
                for fn in impls.values():
                    fn()
            for _ in range(args.iters):
                for name, fn in impls.items():
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    times[name].append(time.perf_counter() - t0)
            medians = {}
            for impl, ts in times.items():
                results.append(report(args, 'caption_generate', impl, {
                    'median_s': statistics.median(ts), 'min_s': min(ts), 'max_s': max(ts), 'iters': len(ts),
                    'warmup': args.warmup, 'interleaved': True}, B, flops=flops, extra=extra))
                medians[impl] = results[-1]['median_s']
            print(f"speed-up vs transformers at B={B} (interleaved): "
                  f"{medians['transformers'] / medians['ours']:.2f}x"
                  + (f"; with cuda_graph: {medians['transformers'] / medians['ours_cudagraph']:.2f}x"
                     if args.cuda_graph else '')
                  + (f"; without the skinny CPU linear: {medians['transformers'] / medians['ours_plain_linear']:.2f}x"
                     if args.plain_linear else ''), flush=True)
            continue
        results.append(report(args, 'caption_generate', 'ours', time_fn(ours, args), B, flops=flops, extra=extra))
        if hf is not None:
            results.append(report(args, 'caption_generate', 'transformers',
                                  time_fn(theirs, args, iters=args.hf_iters or args.iters, warmup=min(args.warmup, 2)),
                                  B, flops=flops, extra=extra))
            print(f"speed-up vs transformers at B={B}: {results[-1]['median_s'] / results[-2]['median_s']:.2f}x",
                  flush=True)
    return results


if __name__ == '__main__':
    main()
