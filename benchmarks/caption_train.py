"""Caption training step (BLIP_Decoder: ViT + image-grounded MED decoder, LM loss), fwd + bwd + AdamW.

Issue 7 workload: batch 32 @384, base size. Peers (H100): original 85 img/s fp32, 176 bf16 autocast;
transformers 88 fp32, 181 bf16. Target: >= 3x the original's fp32.

    python benchmarks/caption_train.py --device cuda --amp bf16 [--compare-hf]
    python benchmarks/caption_train.py --device cuda --amp bf16 --vit large --ckpt-layer 24   # ViT-L memory target
    python benchmarks/caption_train.py --device cpu --size tiny --compare-hf                 # smoke test
"""
from __future__ import annotations

import random

import torch

from common import (add_step_args, autocast, check, compiled_impl_name, count_flops, device_busy, finish_args, hf_twin,
                    maybe_compile, med_spec, parser, report, time_fn, vit_spec)
from models.blip import BLIP_Decoder

WORDS = ('man woman dog cat riding sitting standing table street red blue large small two group people holding '
         'white black green bus train plate food water field grass tree building sign next to on of in with the '
         'a near top front').split()


def captions(batch: int, seed: int = 0) -> list[str]:
    """'a picture of ' + 8-14 words: COCO-like lengths (about 16-22 tokens with [DEC], prompt and [SEP])."""
    rnd = random.Random(seed)
    return ['a picture of ' + ' '.join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 14))) for _ in range(batch)]


def build(args) -> BLIP_Decoder:
    vit = args.vit if args.vit != 'base' else vit_spec(args.size)
    return BLIP_Decoder(med_config=med_spec(args.size), image_size=args.image_size, vit=vit,
                        vit_grad_ckpt=args.ckpt_layer > 0, vit_ckpt_layer=args.ckpt_layer).to(args.device)


def hf_inputs(model: BLIP_Decoder, caps: list[str], device):
    """The exact ids/labels our forward builds: [DEC] first, pad and prompt -> -100."""
    tok = model.tokenizer(caps, padding='longest', truncation=True, max_length=40, return_tensors='pt').to(device)
    ids = tok.input_ids.clone()
    ids[:, 0] = model.tokenizer.bos_token_id
    labels = ids.masked_fill(ids == model.tokenizer.pad_token_id, -100)
    labels[:, :model.prompt_length] = -100
    return ids, tok.attention_mask, labels


def main(argv=None):
    p = parser('BLIP caption training step (fwd+bwd+AdamW)', batch=32, image_size=384)
    p.add_argument('--vit', default='base', choices=['base', 'large'])
    p.add_argument('--ckpt-layer', type=int, default=0, help='gradient-checkpoint the last N ViT blocks')
    args = finish_args(add_step_args(p).parse_args(argv))
    dev = args.device
    model = build(args)
    image = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
    caps = captions(args.batch)

    hf = None
    if args.compare_hf:
        hf = hf_twin(model, 'caption', args.size, args.image_size).to(dev)
        model.eval(), hf.eval()
        n = min(4, args.batch)
        ids, mask, labels = hf_inputs(model, caps[:n], dev)
        with torch.no_grad():
            ours_loss = model(image[:n], caps[:n])
            hf_loss = hf(pixel_values=image[:n], input_ids=ids, attention_mask=mask, labels=labels).loss
        err = abs(float(ours_loss) - float(hf_loss)) / abs(float(hf_loss))
        check('caption loss == transformers (fp32, eval)', err < 1e-4, f'ours {float(ours_loss):.6f} '
              f'hf {float(hf_loss):.6f} rel {err:.1e}')

    def make_step(net, forward):
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.05,
                                fused=dev == 'cuda')

        def step():
            with autocast(args):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    results = []
    model.train()
    maybe_compile(model, args)
    step = make_step(model, lambda: model(image, caps))
    flops = None if args.no_flops else count_flops(step)
    name = 'caption_train' + ('' if args.vit == 'base' else f'_vit{args.vit}_ckpt{args.ckpt_layer}')
    timing = time_fn(step, args)
    extra = device_busy(step, args, timing['median_s']) if args.profile else None
    results.append(report(args, name, compiled_impl_name(args), timing, args.batch, flops=flops,
                          extra=extra))
    del step
    if hf is not None:
        model.cpu()
        torch.cuda.empty_cache() if dev == 'cuda' else None
        hf.train()
        ids, mask, labels = hf_inputs(model, caps, dev)
        hstep = make_step(hf, lambda: hf(pixel_values=image, input_ids=ids, attention_mask=mask, labels=labels).loss)
        results.append(report(args, name, 'transformers', time_fn(hstep, args), args.batch, flops=flops))
    return results


if __name__ == '__main__':
    main()
