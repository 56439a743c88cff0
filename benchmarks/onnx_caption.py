"""Captioning on onnxruntime (``models.onnx_generate``) vs PyTorch (``BLIP_Decoder`` path), CPU, same weights.

Both run the ViT, the cross-attention keys/values and this project's beam search (``models.generation``) to
token ids; only the network's runtime differs. Random weights at the requested size (no downloads), exported
with ``models.export_onnx.export_task`` into a temporary folder. Runs alternate (PyTorch, onnxruntime, ...)
so both see the same load on a shared machine. Tokens are checked equal before timing. By default decoding
runs to ``max_length`` (``--min-length`` = ``--max-length``): random weights end captions at random places, a
fixed number of steps makes the work per call the same for both.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/onnx_caption.py --threads 2 --batches 1,2 --num-beams 3 --ort-no-spin \
        --json bench_results/cpu_onnx_caption.jsonl

On a CPU shared with other jobs, set ``OMP_WAIT_POLICY=PASSIVE``: PyTorch's OpenMP threads otherwise spin at
every barrier, and with more runnable threads than cores a descheduled partner turns each of the thousands of
small parallel regions per decode step into a wait for a time slice (measured here under a load average of
~12 on 2 cores: tiny model, beam 3, 2 threads, 12.3 s per caption spinning vs 0.08 s passive).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import TINY_MED, TINY_VIT, check, finish_args, parser, report
from models.blip import BLIP_Decoder
from models.export_onnx import export_task
from models.generation import generate
from models.onnx_generate import OnnxCaptioner

try:
    from onnxruntime import __version__ as ort_version
except ImportError:  # reported by OnnxCaptioner when it is needed
    ort_version = None


def main(argv=None):
    p = parser('BLIP captioning: onnxruntime vs PyTorch (CPU)', batch=1, image_size=384)
    p.add_argument('--batches', default='1,2', help='comma-separated batch sizes')
    p.add_argument('--num-beams', type=int, default=3)
    p.add_argument('--max-length', type=int, default=20)
    p.add_argument('--min-length', type=int, default=None, help='default: --max-length (fixed work per call)')
    p.add_argument('--ort-no-spin', action='store_true', help="onnxruntime's idle threads sleep instead of spinning")
    p.set_defaults(device='cpu', amp='none', warmup=1)
    args = finish_args(p.parse_args(argv))
    if args.device != 'cpu' or args.amp != 'none':
        raise SystemExit('this benchmark compares fp32 CPU runtimes (--device cpu --amp none)')
    min_length = args.max_length if args.min_length is None else args.min_length
    threads = args.threads or torch.get_num_threads()
    kwargs = {} if args.size == 'base' else {'vit': dict(TINY_VIT), 'med_config': dict(TINY_MED)}
    model = BLIP_Decoder(image_size=args.image_size, **kwargs).eval()
    sizes = {'image_size': args.image_size, 'vit': kwargs.get('vit', 'base'), 'med_config': {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = export_task(model, sizes, 'caption', Path(tmp))
        model.tokenizer.save_pretrained(tmp)
        (Path(tmp) / 'export.json').write_text(json.dumps(manifest))
        print(f'export {time.perf_counter() - t0:.0f} s; max |onnxruntime - PyTorch| on the export inputs: '
              f"{manifest['max_abs_diff_vs_pytorch']}", flush=True)
        captioner = OnnxCaptioner(tmp, threads=threads, spin=not args.ort_no_spin)
        for B in (int(b) for b in args.batches.split(',')):
            args.batch = B
            image = torch.randn(B, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(B))
            decode = dict(num_beams=args.num_beams, max_length=args.max_length, min_length=min_length)

            @torch.no_grad()
            def run_torch():
                return generate(model.text_decoder, model.prompt_ids(B, 'cpu'), model.visual_encoder(image),
                                eos_token_id=102, pad_token_id=0, **decode)

            def run_ort():
                return captioner.generate_ids(image.numpy(), **decode)

            same = run_torch().tolist() == run_ort().tolist()
            check(f'tokens B={B}', same, 'onnxruntime and PyTorch decode the same ids')
            times = {'pytorch': [], 'onnxruntime': []}
            for i in range(args.warmup + args.iters):
                for name, fn in (('pytorch', run_torch), ('onnxruntime', run_ort)):
                    t0 = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                timing = {'median_s': statistics.median(ts), 'min_s': min(ts), 'max_s': max(ts), 'iters': len(ts),
                          'warmup': args.warmup}
                report(args, 'onnx_caption', name, timing, B,
                       extra={'num_beams': args.num_beams, 'max_length': args.max_length, 'min_length': min_length,
                              'threads': threads, 'opset': manifest['opset'], 'tokens_equal': same,
                              'random_weights': True, 'onnxruntime': ort_version,
                              'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
                              'ort_spinning': not args.ort_no_spin,
                              'loadavg_1min': os.getloadavg()[0]})


if __name__ == '__main__':
    main()
