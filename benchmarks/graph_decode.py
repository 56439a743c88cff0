"""Caption decoding with each decode step captured as one CUDA graph: ``generate(..., cuda_graph=True)``.

The runner is ``models.generation._GraphedDecoder``. (The H100 numbers in BENCHMARKS.md were taken with a
benchmark-local copy of the same class, swapped in for ``_Decoder``; it then moved into generation.py
unchanged apart from names.)

Why: on the H100 the eager decoder is host-bound (~275 kernel launches per step, ~10-12 ms per step on the
device machine's CPU at batch 1 and at batch 32). A CUDA graph replays the step's kernels with one launch.

How (a runner like ``models.generation._Decoder``; the beam/greedy bookkeeping is unchanged):
  * the prompt step runs eagerly into a preallocated ``models.med.KVCache`` [layers, R, h, max_length, d];
  * every later step is ONE static computation: token and position in fixed buffers, the new key/value
    written with ``index_copy_`` at the position, self-attention over all ``max_length`` cache slots with an
    additive mask (0 up to the current position, -inf beyond: exactly-zero probabilities), cross-attention on
    the per-image K/V computed once. Captured at the first such step (autocast weight-cast cache disabled
    inside, so the graph owns its casts), replayed for the others; buffers and graph are kept for the next
    call with the same shapes (which loads its image K/V into them), so only a first call captures:
    ``ours_cudagraph_first_call`` times calls that each capture (kept state released before each).
  * beam reordering gathers the static cache in place (outside the graph).
The masked full-length attention is the same function as the eager attention over the valid prefix;
kernels differ (memory-efficient vs flash), so tokens are CHECKED against eager ``generation.generate``
before timing (rows printed), not assumed.

On the CPU the same static step runs eagerly (no graph): that checks the static-cache logic.

    python benchmarks/graph_decode.py --device cuda --amp bf16 --batches 32,1
"""
from __future__ import annotations

import torch

from common import autocast, finish_args, med_spec, parser, report, time_fn, vit_spec
from models import generation
from models.blip import BLIP_Decoder

SEP, PAD = 102, 0


def main(argv=None):
    p = parser('caption generation with CUDA-graph decode steps (prototype)', batch=32, image_size=384)
    p.add_argument('--batches', default=None)
    p.add_argument('--num-beams', type=int, default=3)
    p.add_argument('--max-length', type=int, default=20)
    p.add_argument('--min-length', type=int, default=5)
    args = finish_args(p.parse_args(argv))
    dev = args.device
    model = BLIP_Decoder(med_config=med_spec(args.size), image_size=args.image_size, vit=vit_spec(args.size))
    model = model.to(dev).eval()
    kw = dict(num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length)
    for B in ([int(b) for b in args.batches.split(',')] if args.batches else [args.batch]):
        args.batch = B
        image = torch.randn(B, 3, args.image_size, args.image_size, device=dev,
                            generator=torch.Generator(dev).manual_seed(B))
        prompt = model.prompt_ids(B, dev)

        @torch.no_grad()
        def run(graphed: bool, **over):
            with autocast(args):
                return generation.generate(model.text_decoder, prompt, model.visual_encoder(image), None,
                                           eos_token_id=SEP, pad_token_id=PAD, cuda_graph=graphed, **{**kw, **over})

        rows = {}
        for name, over in [('beam', {}), ('greedy', dict(num_beams=1))]:
            a, b = run(False, **over), run(True, **over)
            rows[name] = int((a == b).all(1).sum()) if a.shape == b.shape else 0
            print(f'check graphed {name} tokens == eager generate (B={B}, amp={args.amp}): {rows[name]}/{B} rows',
                  flush=True)
        eager = report(args, 'caption_generate', 'ours_eager', time_fn(lambda: run(False), args), B)
        graphed = report(args, 'caption_generate', 'ours_cudagraph' if dev == 'cuda' else 'ours_static',
                         time_fn(lambda: run(True), args), B,
                         extra={'beam_rows_equal_eager': rows['beam'], 'greedy_rows_equal_eager': rows['greedy']})
        first = report(args, 'caption_generate', 'ours_cudagraph_first_call' if dev == 'cuda' else 'ours_static_first_call',
                       time_fn(lambda: (generation.release_static_decoding(), run(True)), args), B)
        print(f"graph speed-up at B={B}: {eager['median_s'] / graphed['median_s']:.2f}x "
              f"(calls that capture: {eager['median_s'] / first['median_s']:.2f}x)", flush=True)


if __name__ == '__main__':
    main()
