"""Weight-streaming rate of skinny CPU linear layers: ``F.linear`` vs ``med.Linear`` (transposed / oneDNN kernels).

Decoding runs the decoder on a few rows per step (beams x images), so every linear layer is a product of a
[R, in] activation with a weight that has to come from memory; the rate at which the weights are read sets
the step time. Weights are cycled through ``--copies`` distinct tensors so that they come from DRAM, as in a
real decode step, not from the cache. Methods are interleaved and the best of ``--rounds`` is kept, because
the CPU may be shared.

    python benchmarks/cpu_linear.py --threads 2 --json bench_results/cpu_linear.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.med import Linear  # noqa: E402


def seconds(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rows', type=int, nargs='+', default=[1, 2, 3, 4, 6, 8, 12, 16, 32])
    parser.add_argument('--copies', type=int, default=24)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [(768, 768), (768, 3072), (3072, 768), (768, 30524)]
    with torch.no_grad():
        for in_f, out_f in shapes:
            copies = args.copies if out_f < 10000 else max(2, args.copies // 10)
            layers = [Linear(in_f, out_f) for _ in range(copies)]
            gb = copies * in_f * out_f * 4 / 1e9
            for rows in args.rows:
                x = torch.randn(rows, in_f)
                methods = {'F.linear': lambda: [F.linear(x, m.weight, m.bias) for m in layers],
                           'med.Linear': lambda: [m(x) for m in layers]}
                best = dict.fromkeys(methods, float('inf'))
                for _ in range(args.rounds):
                    for name, fn in methods.items():
                        best[name] = min(best[name], seconds(fn, 3))
                diff = (F.linear(x, layers[0].weight, layers[0].bias) - layers[0](x)).abs().max().item()
                row = {'in': in_f, 'out': out_f, 'rows': rows, 'threads': args.threads,
                       **{f'{k}_GBps': round(gb / v, 2) for k, v in best.items()},
                       'speedup': round(best['F.linear'] / best['med.Linear'], 2), 'max_abs_diff': diff}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, 'a') as f:
                        f.write(json.dumps({**row, 'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d')}) + '\n')


if __name__ == '__main__':
    main()
