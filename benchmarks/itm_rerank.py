"""One ITM re-rank query: 256 candidate texts x one image's 577 tokens (retrieval evaluation, k_test=256).

Issue 7 workload. Peers (H100): original 169 ms fp32; transformers 164 ms fp32, 39 ms bf16.
The original (and transformers) repeat the image tokens 256 times and project them to K/V in every layer
256 times; ours computes the image's cross-attention K/V once (``MED.precompute_cross_kv``) and folds the
256 text rows into the query length of one attention call (text batch r*B_img vs image batch B_img).

Texts are [ENC] + tokens, padded to max_length 35 as the original's evaluation tokenises them
(padding='max_length'), with COCO-like valid lengths; ``--dynamic-padding`` also times the same query with
the padding trimmed to the longest candidate (same scores: padded keys are masked out).

    python benchmarks/itm_rerank.py --device cuda --amp bf16 --compare-hf
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common import autocast, check, count_flops, finish_args, hf_twin, med_spec, parser, rel_err, report, time_fn
from models.blip import load_med_config
from models.med import MED
from models.vit import create_vit

ENC = 30523


class ITMModel(nn.Module):
    """BLIP_ITM's modules and keys (visual_encoder, text_encoder, vision_proj, text_proj, itm_head)."""

    def __init__(self, size: str, image_size: int, embed_dim: int = 256):
        super().__init__()
        from common import vit_spec
        self.visual_encoder, width = create_vit(vit_spec(size), image_size)
        self.text_encoder = MED(load_med_config(med_spec(size), encoder_width=width))
        hidden = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)

    def itm_scores(self, ids, mask, image_embeds=None, cross_kv=None):
        """ITM logit 'match' (column 1, the raw logit the evaluation adds to the ITC sim) per text row.

        ``image_embeds`` [B_img, N, W] with ``ids`` [r*B_img, L] (rows grouped per image) or ``cross_kv``.
        """
        out = self.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds, cross_kv=cross_kv,
                                mode='multimodal')
        return self.itm_head(out.last_hidden_state[:, 0]).float()[:, 1]


def random_texts(n: int, max_length: int, device, seed: int = 0, vocab: int = 30522):
    """[ENC] + random word ids + [SEP], COCO-like valid lengths 9-24 (clipped normal), padded to max_length."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=g) * 3 + 15).round().clamp(9, min(24, max_length)).long()
    ids = torch.randint(1000, vocab, (n, max_length), generator=g)
    pos = torch.arange(max_length)[None]
    mask = (pos < lengths[:, None]).long()
    ids[:, 0] = ENC
    ids[pos == (lengths[:, None] - 1)] = 102
    ids = ids * mask
    return ids.to(device), mask.to(device)


def main(argv=None):
    p = parser('one ITM re-rank query (256 texts x 577 image tokens)', batch=256, image_size=384)
    p.add_argument('--max-length', type=int, default=35)
    args = finish_args(p.parse_args(argv))
    dev = args.device
    model = ITMModel(args.size, args.image_size).to(dev).eval()
    k = args.batch
    ids, mask = random_texts(k, args.max_length, dev)
    with torch.no_grad():
        image_embeds = model.visual_encoder(torch.randn(1, 3, args.image_size, args.image_size, device=dev))

    @torch.no_grad()
    def ours():
        with autocast(args):
            return model.itm_scores(ids, mask, image_embeds)  # K/V once, 256 rows share them

    L = int(mask.sum(1).max())

    @torch.no_grad()
    def ours_trimmed():
        with autocast(args):
            return model.itm_scores(ids[:, :L], mask[:, :L], image_embeds)

    results = []
    hf = None
    if args.compare_hf:
        hf = hf_twin(model, 'retrieval', args.size, args.image_size).to(dev).eval()
        ones = torch.ones(k, image_embeds.shape[1], dtype=torch.long, device=dev)

        @torch.no_grad()
        def theirs():
            with autocast(args):
                h = hf.text_encoder(input_ids=ids, attention_mask=mask,
                                    encoder_hidden_states=image_embeds.expand(k, -1, -1),
                                    encoder_attention_mask=ones, return_dict=True).last_hidden_state
                return hf.itm_head(h[:, 0]).float()[:, 1]

        err = rel_err(ours(), theirs())
        check(f'ITM logits == transformers (amp={args.amp})', err < (1e-4 if args.amp == 'none' else 3e-2),
              f'rel err {err:.1e}')
    err = rel_err(ours_trimmed(), ours())
    check('dynamic padding keeps the scores', err < (1e-5 if args.amp == 'none' else 3e-2), f'rel err {err:.1e}')
    flops = None if args.no_flops else count_flops(ours)
    results.append(report(args, 'itm_rerank_query', 'ours', time_fn(ours, args), k, unit='text',
                          flops=flops, extra={'text_len': args.max_length}))
    results.append(report(args, 'itm_rerank_query', 'ours_dynpad', time_fn(ours_trimmed, args), k, unit='text',
                          extra={'text_len': L}))
    if hf is not None:
        results.append(report(args, 'itm_rerank_query', 'transformers', time_fn(theirs, args), k, unit='text',
                              flops=flops, extra={'text_len': args.max_length}))
    return results


if __name__ == '__main__':
    main()
