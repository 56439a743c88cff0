"""How a script ends on an error: one readable message for a user's mistake, a traceback only when asked.

``run_script(main)`` is every script's ``__main__``. A user error (config, command line, data, checkpoint, an
output folder in use, a diverged run) prints ``error: <message>`` on stderr and exits with 2 (usage: a config
key or flag) or 1 (the rest); the traceback follows only with ``--debug`` or ``BLIP_DEBUG=1``. Any other
exception is a bug and keeps Python's traceback.

Under torchrun every rank meets the same config error: rank 0 reports it and the others exit quietly with the
same status. An error that only one rank met (its data shard) is reported by that rank, naming it.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ['run_script', 'user_error_types', 'exit_status']

DEBUG_ENV = 'BLIP_DEBUG'


def user_error_types() -> tuple[type, ...]:
    """Exceptions that mean the input (config, flags, files) is at fault, not the code."""
    from data.loading import AnnotationError, BadSampleError
    from engine.checkpoint_io import NonFiniteWeightsError
    from engine.config import ConfigError
    from engine.lock import OutputDirInUse
    from engine.loop import NonFiniteLossError
    from models.checkpoint import CheckpointError
    return (ConfigError, AnnotationError, BadSampleError, CheckpointError, OutputDirInUse, NonFiniteLossError,
            NonFiniteWeightsError, FileNotFoundError)


def exit_status(error: BaseException) -> int:
    from engine.config import ConfigError
    return 2 if isinstance(error, ConfigError) else 1


def _rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # noqa: BLE001  (a broken process group must not hide the real error)
        pass
    return int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) or 0)


def _same_on_every_rank(error: BaseException) -> bool:
    """Errors every rank meets alike (read from the same config / files before any rank-specific work)."""
    from engine.config import ConfigError
    from engine.lock import OutputDirInUse
    from models.checkpoint import CheckpointError
    return isinstance(error, (ConfigError, CheckpointError, OutputDirInUse))


def run_script(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Call ``main(argv)`` and exit: 0, or a user error's status with one message (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv or os.environ.get(DEBUG_ENV, '') not in ('', '0')
    try:
        main(argv)
    except user_error_types() as error:
        status = exit_status(error)
        rank = _rank()
        if rank != 0 and _same_on_every_rank(error) and not debug:
            sys.exit(status)  # rank 0 says it once
        where = f'[rank {rank}] ' if rank != 0 else ''
        if debug:
            traceback.print_exc()
        message = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else \
            f'{error.strerror}: {error.filename}'
        print(f'{where}error: {message}' + ('' if debug else f'\n(traceback: --debug or {DEBUG_ENV}=1)'),
              file=sys.stderr, flush=True)
        sys.exit(status)
    sys.exit(0)
