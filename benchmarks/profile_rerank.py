"""Diagnose the ITM re-rank cost per text row vs rows per image (one image's K/V shared by r texts)."""
from __future__ import annotations

import torch

from common import autocast, finish_args, parser, time_fn
from itm_rerank import ITMModel, random_texts


def main(argv=None):
    p = parser('ITM rows-per-image scaling + profile', batch=256, image_size=384)
    args = finish_args(p.parse_args(argv))
    dev = args.device
    model = ITMModel(args.size, args.image_size).to(dev).eval()
    ids, mask = random_texts(2048, 24, dev)
    tokens = (args.image_size // 16) ** 2 + 1 if args.size == 'base' else (args.image_size // 8) ** 2 + 1
    width = 768 if args.size == 'base' else 32
    emb = torch.randn(4, tokens, width, device=dev)
    for r, bi in [(256, 1), (1280, 1), (2048, 1), (256, 4), (512, 4)]:
        n = r * bi  # text rows, grouped r per image
        with torch.no_grad(), autocast(args):
            kv = model.text_encoder.precompute_cross_kv(emb[:bi])
            t = time_fn(lambda: model.itm_scores(ids[:n], mask[:n], cross_kv=kv), args)
        print(f'rows/image {r:5d} images {bi}: {1e3 * t["median_s"]:8.2f} ms  {n / t["median_s"]:9.0f} rows/s', flush=True)
    if dev == 'cuda':
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), autocast(args):
            kv = model.text_encoder.precompute_cross_kv(emb[:1])
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                model.itm_scores(ids[:1280], mask[:1280], cross_kv=kv)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=14, max_name_column_width=60))


if __name__ == '__main__':
    main()
