"""One writer per directory: an OS lock held for a process's whole life.

    with runlock.acquire(directory, "vlp-train"):   # raises Busy naming the holder
        ...

The lock is `fcntl.flock` on a hidden file inside the directory, `.NAME.lock` (`NAME` defaults to
vlp; `vlp-shard` uses one name per --node-rank, so separate nodes share an output). The kernel
releases it when the holding process dies, however it dies, so a SIGKILLed run never leaves a
stale lock; the file itself stays (removing a lock file races with its next holder) and holds
the last holder's pid, host and program for the message a refused process prints.

Forked children (DataLoader workers, process pools) close their inherited copy at once: a
flock belongs to the open file, so an orphaned worker that outlives its killed parent for a few
seconds would otherwise keep the directory locked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

_held: set[int] = set()
"""File descriptors of the locks this process holds (closed in forked children)."""


class Busy(Exception):
    """Another live process holds the directory's lock (one line naming it)."""


def lock_path(directory: Path, name: str = "vlp") -> Path:
    return Path(directory) / f".{name}.lock"


class RunLock:
    """A held lock; `release()` (or leaving the `with` block, or exiting) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd in _held:  # not in a forked child, which closed its copy already
            _held.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(directory: Path, program: str, name: str = "vlp", advice: str = "") -> RunLock:
    """Lock `directory` (created if missing) for this process, or raise Busy at once (its
    message names the holder, then `advice`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        advice = f"; {advice}" if advice else ""
        raise Busy(f"{directory} is in use by {holder(path)}{advice}") from None
    holder_info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "program": program,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_info) + "\n").encode(), 0)
    _held.add(fd)
    return RunLock(path, fd)


def holder(path: Path) -> str:
    """`vlp-train (pid 123 on host h since ...)`, from the lock file; a generic phrase if the
    holder has not written it yet."""
    try:
        info = json.loads(Path(path).read_text())
        return (
            f"{info['program']} (pid {info['pid']} on host {info['host']}, since {info['since']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _close_in_child() -> None:
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
