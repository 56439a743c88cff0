"""Turn a sharded checkpoint (``checkpoint_format: sharded``) into the one-file checkpoint in the original layout.

    python -m engine.convert_checkpoint output/pretrain/checkpoint_last.dcp checkpoint_last.pth

The output is what ``checkpoint_format: full`` writes (``{'model', 'optimizer', 'config', 'epoch', 'resume',
'rng'}``): the single-process model loads its ``model`` strictly, ``predict.py`` and the original code read it,
and ``--resume`` continues from it with any number of processes. It runs in one process on the CPU, without the
model, and needs the memory of the whole checkpoint. The other way needs no converter: resume from a one-file
checkpoint with ``--options checkpoint_format=sharded`` and the next resume point is sharded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.checkpoint_io import atomic_torch_save
from engine.sharded_checkpoint import SHARDED_SUFFIX, is_sharded_checkpoint, sharded_to_full
from models.checkpoint import CheckpointError

__all__ = ['convert', 'main']


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write the one-file checkpoint of the sharded checkpoint ``src`` to ``dst`` (atomically)."""
    src = Path(src)
    if src.is_file():
        raise CheckpointError(f'{src}: a one-file checkpoint already (expected a sharded {SHARDED_SUFFIX} '
                              f'directory); to make a sharded one, resume from it with --options '
                              f'checkpoint_format=sharded')
    if src.is_dir() and not is_sharded_checkpoint(src):
        raise CheckpointError(f'{src}: not a sharded checkpoint (no .metadata or meta.pth in the directory)')
    return atomic_torch_save(sharded_to_full(src), dst)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('src', help=f'a sharded checkpoint directory (checkpoint_last{SHARDED_SUFFIX})')
    parser.add_argument('dst', help='the one-file checkpoint to write (.pth)')
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst)
    print(f'wrote {out}')
    return out


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 1 (traceback with --debug)
