"""Atomic file writes: write a temporary file beside the target, fsync, rename over it.

Every file the code base publishes (checkpoints, result JSON, config.yaml, annotation indexes, CapFilt
shards, the toy dataset) goes through ``atomic_write``: a reader or a crash at any moment sees either the
previous file or the new one, never a torn one.

Temporary names carry the writer (host, pid, a random token), so two writers of the same target never
share or delete each other's temporary file; only a writer's own temporary file is removed on failure,
and one left by a *dead* writer on this host (SIGKILL mid-write of a multi-GB checkpoint) is removed by
the next write of the same target.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import socket
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ['atomic_write', 'atomic_write_text', 'atomic_write_bytes', 'atomic_write_with', 'temp_path',
           'remove_dead_writers_temps']

_HOST = socket.gethostname().replace('.', '-') or 'host'


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` that says whose it is: ``.NAME.HOST.PID.TOKEN.tmp``."""
    path = Path(path)
    return path.with_name(f'.{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_dead_writers_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of ``path`` whose writer ran on this host and is gone; return them.

    A live writer's file (or one from another host, whose processes cannot be checked) is never touched."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        parts = tmp.name[len(path.name) + 2:-len('.tmp')].rsplit('.', 2)
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = True, fsync: bool = True,
                 encoding: str = 'utf-8') -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced when the block ends without error.

    The temporary file gets the permissions of the process's umask (``tempfile.mkstemp`` would make it 0600,
    unreadable by a shared group). ``fsync``: flush to disk before the rename (checkpoints, results); caches
    that can be rebuilt may skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_temps(path)
    tmp = temp_path(path)
    f = open(tmp, 'xb' if binary else 'x', **({} if binary else {'encoding': encoding}))
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # our own temporary file only
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    with atomic_write(path, binary=False, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    with atomic_write(path, fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                      fsync: bool = True) -> Path:
    """``write(file)`` into ``path`` atomically."""
    with atomic_write(path, binary=binary, fsync=fsync) as f:
        write(f)
    return Path(path)
