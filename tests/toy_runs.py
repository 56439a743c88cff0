"""Runs the real task scripts on the toy configs: in-process (what the learning tests train with), or the
environment and log reading for a script run as a subprocess (the resume and multi-process tests)."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, config: str, toy: Path, out: Path, *options: str) -> list[dict]:
    """Run ``script.main`` in-process on the toy config; returns every line of its ``log.txt``."""
    ann_root = [] if script == 'pretrain' else [f'ann_root={toy}/annotation']
    argv = ['--config', str(ROOT / 'configs' / 'toy' / f'{config}.yaml'), '--output_dir', str(out),
            '--device', 'cpu', '--seed', '0', '--options', f'toy_root={toy}', *ann_root, 'num_workers=0', *options]
    importlib.import_module(script).main(argv)
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines() if line.strip()]


def script_env() -> dict:
    """The environment of a script run as a subprocess: one thread per process (the test workers share the
    cores), no hub access, the project importable."""
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}


def steps_logged(out: Path) -> list[tuple[int, int]]:
    """(epoch, step) of every line of ``train_log.jsonl`` in ``out`` so far ([] before the first)."""
    path = out / 'train_log.jsonl'
    if not path.exists():
        return []
    return [(r['epoch'], r['step']) for r in map(json.loads, path.read_text().splitlines())]
