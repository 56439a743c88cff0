"""Metrics as JSON lines, one object per line, flushed as they come (tail -f friendly)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ['JsonLogger']


def _plain(value):
    """Tensors and numpy scalars to Python numbers; NaN/inf as strings so every line stays valid JSON."""
    if hasattr(value, 'item'):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLogger:
    """Append ``{"time": ..., **metrics}`` lines to ``output_dir/filename``."""

    def __init__(self, output_dir: str | os.PathLike, filename: str = 'train_log.jsonl'):
        self.path = Path(output_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict) -> None:
        record = {'time': round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
