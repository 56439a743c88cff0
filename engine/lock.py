"""One live run per output folder: an exclusive lock on ``OUTPUT_DIR/.run.lock`` held for the process's life.

Two runs in one folder interleaved their lines in ``train_log.jsonl`` and replaced each other's checkpoints.
The lock is ``flock`` on the file (on Linux NFS clients ``flock`` is carried out as an NFS byte-range lock, so
it holds across hosts); the kernel drops it when the process ends however it ends, so a crashed run leaves
no stale lock. The file names the holder (host, pid, start time, command) for the refusal's message.

Where the filesystem refuses ``flock`` (some FUSE and older network mounts), the lock is the file's
existence (``O_CREAT | O_EXCL``), removed at exit; one left by a dead process on this host is stale and
taken over; one from another host is named in the message with how to remove it.

A forked child (a DataLoader worker) closes its copy of the lock's descriptor: a flock belongs to the open file,
so workers that outlive a killed run (they notice the parent's death only within seconds) held the lock, and
``--resume auto`` started at once was refused, naming the dead run.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ['OutputDirInUse', 'OutputDirLock', 'lock_output_dir', 'release_output_dir', 'LOCK_NAME']

LOCK_NAME = '.run.lock'
_HELD: dict[Path, 'OutputDirLock'] = {}  # this process's locks (a second Run.start in-process reuses them)


class OutputDirInUse(RuntimeError):
    """Another live run holds the output folder."""


def _holder_text(info: dict) -> str:
    if not info:
        return 'another process (no holder recorded)'
    since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('since', 0)))
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {since}: {info.get('command', '?')})"


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or '{}')
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """The lock of one output folder; ``acquire`` raises ``OutputDirInUse`` naming the folder and the holder."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: Optional[int] = None
        self._exclusive_file = False
        self._made_dir = False

    def _info(self) -> dict:
        return {'host': socket.gethostname(), 'pid': os.getpid(), 'since': round(time.time(), 3),
                'command': ' '.join([os.path.basename(sys.argv[0] or 'python'), *sys.argv[1:]])[:500]}

    def _refuse(self, info: dict, hint: str = '') -> OutputDirInUse:
        return OutputDirInUse(f'--output_dir {self.output_dir} is in use by another run: {_holder_text(info)}; '
                              f'wait for it to end, stop it, or choose another --output_dir{hint}')

    def acquire(self) -> 'OutputDirLock':
        self._made_dir = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(_read_info(self.path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return self._acquire_exclusive_file()
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info()).encode(), 0)
        return self

    def _acquire_exclusive_file(self) -> 'OutputDirLock':
        """The fallback where ``flock`` is not supported (see module docstring)."""
        path = self.output_dir / (LOCK_NAME + '.excl')
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_info(path)
                stale = info.get('host') == socket.gethostname() and not _pid_alive(int(info.get('pid', 0) or 0))
                if not stale:
                    raise self._refuse(info, f' (if no run is live there, remove {path})') from None
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(self._info(), f)
            self._exclusive_file = True
            atexit.register(self.release)
            return self
        raise self._refuse(_read_info(path))

    def release(self) -> None:
        """Drop the lock (it is dropped anyway when the process ends); the file stays, naming no holder."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._exclusive_file:
            with contextlib.suppress(FileNotFoundError):
                (self.output_dir / (LOCK_NAME + '.excl')).unlink()
            self._exclusive_file = False
        _HELD.pop(self.output_dir.resolve(), None)
        with contextlib.suppress(OSError):
            if self._made_dir and os.listdir(self.output_dir) == [LOCK_NAME]:
                self.path.unlink()  # a run that stopped before writing anything leaves no folder behind
                self.output_dir.rmdir()


def _forget_locks_in_child() -> None:
    """After ``fork``: close this child's copies of the lock descriptors (closing, unlike ``LOCK_UN``, leaves the
    parent's lock in place) and hold nothing, so that ``release`` in the child cannot empty the holder record."""
    for held in _HELD.values():
        if held._fd is not None:
            with contextlib.suppress(OSError):
                os.close(held._fd)
            held._fd = None
        held._exclusive_file = False
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Hold ``output_dir``'s lock until the process ends (or ``release``); a second call in the same process
    for the same folder returns the lock already held."""
    key = Path(output_dir).resolve()
    if key not in _HELD:
        _HELD[key] = OutputDirLock(output_dir).acquire()
    return _HELD[key]


def release_output_dir(output_dir: str | os.PathLike) -> None:
    """Release this process's lock of ``output_dir`` if it holds one."""
    held = _HELD.get(Path(output_dir).resolve())
    if held is not None:
        held.release()
