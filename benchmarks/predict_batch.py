"""End-to-end throughput of ``predict.py --images DIR --task caption`` (decode JPEGs, batch, beam search, write
JSON lines) and peak memory / speed of zero-shot video QA (16 frames x 577 tokens per video at 384 px).

Random weights at the base size, random 480x640 JPEGs written to a temporary folder; nothing is downloaded.
Random weights never emit [SEP] early, so every caption runs to max_length (20): a worst case for decoding.

    python benchmarks/predict_batch.py --device cpu --threads 2 --images 16 --batch 8
    python benchmarks/predict_batch.py --device cuda --images 2048 --batch 64 --videoqa --json results.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import predict  # noqa: E402
from models.blip import blip_decoder  # noqa: E402


def write_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f'{i:06d}.jpg', quality=90)


def caption_throughput(args, device: torch.device, cuda_graph: bool) -> dict:
    torch.manual_seed(0)
    model = blip_decoder(vit='base', image_size=384).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'images'
        folder.mkdir()
        write_images(folder, args.images)
        argv = ['--task', 'caption', '--images', str(folder), '--output', str(Path(tmp) / 'out.jsonl'),
                '--checkpoint', 'unused', '--batch_size', str(args.batch), '--num_workers', str(args.workers),
                '--amp', args.amp] + ([] if cuda_graph else ['--no_cuda_graph'])
        run_args = predict.parse_args(argv)
        # warm-up on one batch (CUDA graph capture, allocator), into a separate file
        warm = argparse.Namespace(**{**vars(run_args), 'output': str(Path(tmp) / 'warm.jsonl'),
                                     'images': str(sorted(folder.iterdir())[0])})
        predict.predict_into(warm, model, 384, device)
        start = time.perf_counter()
        counts = predict.predict_into(run_args, model, 384, device)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {'bench': 'predict_caption', 'device': device.type, 'amp': args.amp if device.type == 'cuda' else 'none',
            'cuda_graph': cuda_graph, 'batch': args.batch, 'images': args.images, 'workers': args.workers,
            'threads': torch.get_num_threads(), 'seconds': round(seconds, 2),
            'images_per_second': round(args.images / seconds, 2), 'rows': counts['written']}


def videoqa_memory(args, device: torch.device) -> list[dict]:
    from models.blip_vqa import blip_vqa
    from models.video_qa import answer_video_questions, tokenize_candidates
    torch.manual_seed(0)
    model = blip_vqa(vit='base', image_size=384).to(device).eval()
    answers = [f'answer {i}' for i in range(1500)]
    candidates = tokenize_candidates(model, answers, device)
    out = []
    for batch, chunk in ((8, 32), (16, 32), (32, 64)):
        video = torch.randn(batch, 16, 3, 384, 384, device=device)
        questions = ['what is the man doing?'] * batch
        for inference in ('rank', 'generate'):
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    answer_video_questions(model, video, questions, inference, candidates, answers, k_test=128,
                                           frame_chunk=chunk)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            out.append({'bench': 'videoqa', 'batch': batch, 'frames': 16, 'frame_chunk': chunk, 'inference': inference,
                        'candidates': len(answers), 'k_test': 128,
                        'peak_gib': round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        'videos_per_second': round(batch / min(times), 2)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--images', type=int, default=16)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--amp', default='bf16', choices=['bf16', 'none'])
    p.add_argument('--videoqa', action='store_true', help='also video QA memory (CUDA only)')
    p.add_argument('--json', default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for graph in ((False, True) if device.type == 'cuda' else (False,)):
        results.append(caption_throughput(args, device, graph))
        print(json.dumps(results[-1]), flush=True)
    if args.videoqa and device.type == 'cuda':
        results += videoqa_memory(args, device)
    if args.json:
        with open(args.json, 'a') as f:
            for r in results:
                f.write(json.dumps({**r, 'torch': torch.__version__,
                                    'gpu': torch.cuda.get_device_name() if device.type == 'cuda' else None}) + '\n')


if __name__ == '__main__':
    main()
