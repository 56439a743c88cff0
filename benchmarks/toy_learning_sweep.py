"""Run many short toy trainings side by side (one CPU thread each) and collect their per-epoch metrics.

Used to choose the toy settings of the learning tests (tests/test_learning.py): which learning rate,
initialisation range, dropout and momentum let a tiny model leave chance on retrieval, VQA and NLVR
within a CI-sized number of steps. Each job is a real script run (``main(argv)`` in a subprocess).

    python benchmarks/toy_learning_sweep.py --jobs benchmarks/sweeps/learning.json --out output/sweep --workers 14
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPTS = {'retrieval': 'train_retrieval', 'vqa': 'train_vqa', 'nlvr': 'train_nlvr', 'caption': 'train_caption',
           'pretrain': 'pretrain'}


def med_config_with(overrides: dict, path: Path) -> Path:
    base = json.loads((ROOT / 'configs' / 'toy' / 'med_config.json').read_text())
    base.update(overrides)
    path.write_text(json.dumps(base, indent=1))
    return path


def run_job(job: dict, toy_roots: dict, out: Path, timeout: float, results: Path) -> dict:
    name, task = job['name'], job['task']
    job_dir = out / name
    job_dir.mkdir(parents=True, exist_ok=True)
    toy = toy_roots[job.get('data', 'toy300')]
    image_key = 'vqa_root' if task == 'vqa' else 'image_root'
    options = [f'toy_root={toy}', f'{image_key}={toy}/images', f'ann_root={toy}/annotation', 'num_workers=0']
    if task == 'caption':
        options.append(f'coco_gt_root={toy}/annotation/coco_gt')
    if job.get('med'):
        options.append(f'med_config={med_config_with(job["med"], job_dir / "med_config.json")}')
    options += job.get('options', [])
    cmd = [sys.executable, f'{SCRIPTS[task]}.py', '--config', f'configs/toy/{task}.yaml', '--output_dir',
           str(job_dir / 'run'), '--device', 'cpu', '--seed', str(job.get('seed', 0)), '--options', *options]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', TQDM_DISABLE='1')
    start = time.time()
    with open(job_dir / 'stdout.txt', 'w') as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 'timeout'
    epochs = []
    log_txt = job_dir / 'run' / 'log.txt'
    if log_txt.exists():
        epochs = [json.loads(line) for line in log_txt.read_text().splitlines() if line.strip()]
    result = {**job, 'rc': rc, 'seconds': round(time.time() - start, 1), 'epochs': epochs}
    with open(results, 'a') as f:
        f.write(json.dumps(result) + '\n')
    print(f'{name}: rc={rc} {result["seconds"]}s last={summary(task, epochs)}', flush=True)
    return result


def summary(task: str, epochs: list) -> str:
    if not epochs:
        return '-'
    last = epochs[-1]
    keys = {'retrieval': ('train_loss_ita', 'train_loss_itm', 'val_txt_r1', 'val_img_r1', 'test_txt_r1', 'test_img_r1'),
            'vqa': ('train_loss', 'test_vqa_accuracy'), 'nlvr': ('train_loss', 'val_acc', 'test_acc'),
            'caption': ('val_CIDEr', 'test_CIDEr'), 'pretrain': ('train_loss_ita', 'train_loss_itm', 'train_loss_lm')}
    return ' '.join(f'{k}={last[k]:.3g}' for k in keys.get(task, ()) if isinstance(last.get(k), (int, float)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--jobs', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--workers', type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument('--timeout', type=float, default=400)
    parser.add_argument('--results', default='', help='results file (default: OUT/results.jsonl)')
    parser.add_argument('--only', default='', help='comma-separated job-name prefixes')
    args = parser.parse_args()
    from data.toy import ensure_toy_dataset
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toy_roots = {'toy300': str(ensure_toy_dataset(out / 'toy300', n_train=300, n_val=30, n_test=30, n_web=4,
                                                  n_videos=2, video_frames=2)),
                 'toy1000': str(ensure_toy_dataset(out / 'toy1000', n_web=4, n_videos=2, video_frames=2))}
    jobs = json.loads(Path(args.jobs).read_text())
    if args.only:
        jobs = [j for j in jobs if any(j['name'].startswith(p) for p in args.only.split(','))]
    with ThreadPoolExecutor(args.workers) as pool:
        results = Path(args.results or out / 'results.jsonl')
        results.parent.mkdir(parents=True, exist_ok=True)
        list(pool.map(lambda j: run_job(j, toy_roots, out, args.timeout, results), jobs))


if __name__ == '__main__':
    main()
