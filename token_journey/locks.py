"""One writer at a time for an output folder: two terminals or a parallel Hydra launcher training the same
SAE must not interleave their checkpoints and saves.

`exclusive(lock_file)` holds an advisory lock (`fcntl.flock`) on a hidden file beside the output for as
long as the block runs. The first process to take it does the work; a second one waits, logging whom it
waits for, and then finds the work done (or, if the first was killed, the first's checkpoint to resume:
the kernel drops a dead process's lock). The holder deletes the file before it lets go, so nothing is
left in the output folder; a waiter that then wakes on the deleted file notices and locks the new one.
flock is local to a machine (and NFS v4 forwards it); on a filesystem without it the lock is skipped with
a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file (its pid and host), for the waiting message."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
    except OSError:
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _acquire(path: Path, what: str) -> int | None:
    """An open descriptor of `path` holding its exclusive lock (None where the filesystem has no flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s is being written by %s; waiting for it to finish (%s)", what, _holder(fd), path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks on this filesystem
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops another process writing %s at the same time", path, exc, what)
            return None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
            return fd
        os.close(fd)  # the previous holder deleted it on its way out: lock the file there now


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Run the block as the only holder of the lock file `path` (created, then deleted on the way out)."""
    fd = _acquire(Path(path), what)
    try:
        yield
    finally:
        if fd is not None:
            Path(path).unlink(missing_ok=True)
            os.close(fd)
