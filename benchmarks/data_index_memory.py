"""Memory of the compact pretraining index: N synthetic entries, RSS per reading process.

    python benchmarks/data_index_memory.py --entries 10000000 --workers 4

Writes a JSONL file of N entries, converts it once into the memory-mapped index, then starts
``--workers`` processes (like DataLoader workers or ranks) that each open the index and read
random entries. Prints the anonymous (private) and file-backed (shared page cache) RSS of each.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from data.pretrain_dataset import load_annotation_index  # noqa: E402


def rss_kib() -> dict:
    """RssAnon / RssFile of this process from /proc (Linux)."""
    fields = {}
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(('RssAnon', 'RssFile', 'VmRSS')):
                name, value = line.split(':')
                fields[name] = int(value.split()[0])
    return fields


def write_entries(path: Path, n: int) -> None:
    with open(path, 'w') as f:
        for start in range(0, n, 100_000):
            f.write(''.join(f'{{"image": "/data/laion/{i:010d}.jpg", "caption": "a photo of item {i}"}}\n'
                            for i in range(start, min(n, start + 100_000))))


def reader(path: str, reads: int, queue) -> None:
    before = rss_kib()
    index = load_annotation_index(path)
    rng = np.random.default_rng(os.getpid())
    for i in rng.integers(0, len(index), reads):
        index[int(i)]
    queue.put((os.getpid(), len(index), before, rss_kib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--entries', type=int, default=10_000_000)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--reads', type=int, default=100_000)
    parser.add_argument('--dir', default=None, help='scratch folder (default: a temporary one)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / 'pretrain.jsonl'
        t0 = time.time()
        write_entries(src, args.entries)
        t1 = time.time()
        load_annotation_index(str(src))
        t2 = time.time()
        offsets = src.with_name(src.name + '.offsets.npy').stat().st_size
        blob = src.with_name(src.name + '.blob').stat().st_size
        print(f'{args.entries} entries: source {src.stat().st_size / 2**20:.0f} MiB written in {t1 - t0:.0f} s; '
              f'index built in {t2 - t1:.0f} s: offsets {offsets / 2**20:.1f} MiB '
              f'({offsets / args.entries:.2f} B/entry), blob {blob / 2**20:.0f} MiB (memory-mapped, shared)')
        queue = mp.get_context('spawn').Queue()
        procs = [mp.get_context('spawn').Process(target=reader, args=(str(src), args.reads, queue))
                 for _ in range(args.workers)]
        for p in procs:
            p.start()
        for _ in procs:
            pid, n, before, after = queue.get()
            print(f'reader pid {pid}: {n} entries, {args.reads} random reads: '
                  f'RssAnon {before["RssAnon"] / 1024:.0f} -> {after["RssAnon"] / 1024:.0f} MiB '
                  f'(+{(after["RssAnon"] - before["RssAnon"]) / 1024:.1f} MiB private), '
                  f'RssFile {after["RssFile"] / 1024:.0f} MiB (shared page cache), VmRSS {after["VmRSS"] / 1024:.0f} MiB')
        for p in procs:
            p.join()


if __name__ == '__main__':
    main()
