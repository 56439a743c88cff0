"""Runs the real task scripts in-process on the toy configs: what the learning tests train with."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, config: str, toy: Path, out: Path, *options: str) -> list[dict]:
    """Run ``script.main`` in-process on the toy config; returns every line of its ``log.txt``."""
    ann_root = [] if script == 'pretrain' else [f'ann_root={toy}/annotation']
    argv = ['--config', str(ROOT / 'configs' / 'toy' / f'{config}.yaml'), '--output_dir', str(out),
            '--device', 'cpu', '--seed', '0', '--options', f'toy_root={toy}', *ann_root, 'num_workers=0', *options]
    importlib.import_module(script).main(argv)
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines() if line.strip()]
