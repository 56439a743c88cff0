"""Per-rank result lists merged into one JSON file by rank 0 (reference 7.5), written atomically.

Called by train_caption.py, eval_nocaps.py, train_vqa.py and eval_videoqa.py through ``save_result``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from engine import distributed as du
from engine.atomic import atomic_write

__all__ = ['save_result']


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename: a reader never sees half a file."""
    with atomic_write(path, binary=False) as f:
        json.dump(obj, f)


def _drop_duplicates(entries: list, key: str) -> list:
    """Keep the first entry of every ``key`` value: distributed samplers pad shards with repeated items."""
    seen, kept = set(), []
    for n, entry in enumerate(entries):
        if key not in entry:
            raise KeyError(f'save_result: entry {n} has no key {key!r} to de-duplicate on: {entry!r}')
        value = entry[key]
        if value not in seen:
            seen.add(value)
            kept.append(entry)
    return kept


def save_result(result: list, result_dir: Union[str, os.PathLike], filename: str, remove_duplicate: str = '') -> str:
    """Merge every rank's results into ``{result_dir}/{filename}.json`` and return that path (on every rank).

    Each rank writes ``{filename}_rank{r}.json``; after a barrier rank 0 concatenates them in rank order,
    keeps the first entry per ``remove_duplicate`` key when one is given, and writes the merged file
    atomically. A second barrier makes the merged file readable by every rank on return.
    """
    folder = Path(result_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(folder / f'{filename}_rank{du.get_rank()}.json', list(result))
    du.barrier()
    final = folder / f'{filename}.json'
    if du.is_main_process():
        merged: list = []
        for r in range(du.get_world_size()):
            with open(folder / f'{filename}_rank{r}.json') as f:
                merged.extend(json.load(f))
        if remove_duplicate:
            merged = _drop_duplicates(merged, remove_duplicate)
        _write_json_atomic(final, merged)
        print(f'result file saved to {final}')
    du.barrier()
    return str(final)
