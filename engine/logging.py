"""Metrics as JSON lines, one object per line, flushed as they come (tail -f friendly)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ['JsonLogger', 'logs_to_resume_point', 'truncate_log']


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


def _keep_line(line: str, keep) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False  # a line torn by a kill mid-write
    return not isinstance(record, dict) or keep(record)


def truncate_log(path: str | os.PathLike, keep) -> int:
    """Rewrite a JSON-lines log with only the records ``keep(record)`` accepts (atomically); return how many
    were dropped. A resumed run's logs then read as one uninterrupted run: the lines written after its resume
    point by the run that was cut off are gone, and the resumed run writes them again."""
    from engine.atomic import atomic_write_text
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    kept = [line for line in lines if _keep_line(line, keep)]
    if len(kept) != len(lines):
        atomic_write_text(path, ''.join(line + '\n' for line in kept))
    return len(lines) - len(kept)


def logs_to_resume_point(output_dir: str | os.PathLike, epoch: int, step: int) -> None:
    """``log.txt`` keeps the epochs before ``epoch``; ``train_log.jsonl`` the steps up to (``epoch``, ``step``)."""
    out = Path(output_dir)
    dropped = truncate_log(out / 'log.txt', lambda r: 'epoch' not in r or int(r['epoch']) < epoch)
    dropped += truncate_log(out / 'train_log.jsonl',
                            lambda r: 'epoch' not in r or (int(r['epoch']), int(r.get('step', 0))) <= (epoch, step))
    if dropped:
        print(f'{out}: {dropped} log line(s) past where this run starts (epoch {epoch}, step {step}) removed from '
              f'log.txt / train_log.jsonl (a run cut off after writing them, or one that saved no checkpoint)')
