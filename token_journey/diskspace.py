"""A local write that runs out of disk space ends as one line and leaves nothing half-written.

Every local artifact is written under a temporary name and renamed into place only when complete
(see `token_journey.layout`), so a reader and a resuming stage take a file under its final name as
complete. `writing(path, needed, *temps)` wraps one such write, whatever does the writing:

- on any failure the temporaries (files or folders) are removed, so a full disk leaves no partial
  file behind and gives back the space the failed write had taken;
- a failure for lack of space (ENOSPC: the filesystem is full, of bytes or of inodes; EDQUOT: the
  user's quota is) becomes a `TokenJourneyError` of one line naming the mount, the path, the bytes the
  write needed and the bytes free (and the `paths.*` setting that put the file there, see
  `remember_roots`), which every stage prints as `error: ...` with exit status 2;
- every other error passes through unchanged.

Files already complete are kept, so a rerun after space is freed continues where the stage stopped
(harvest from its complete shards, training from its last checkpoint) and writes the same bytes.

Libraries report a full disk differently: Python and pyarrow raise OSError with errno 28,
safetensors a `SafetensorError` whose message ends "(os error 28)"; `no_space_errno` reads both.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from token_journey.errors import TokenJourneyError

NO_SPACE = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
"""The errnos of a full disk, and how the one-line error starts for each."""

_OS_ERROR = re.compile(r"\((?:os error|errno) (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)
_ROOTS: dict[Path, str] = {}


def remember_roots(roots: Mapping[str, object]) -> None:
    """Record which `paths.<key>` setting each local root comes from (the `Layout`'s roots), so the
    error can tell the user which setting moves the output elsewhere."""
    for key, root in roots.items():
        if isinstance(root, Path):
            _ROOTS[Path(os.path.abspath(root))] = f"paths.{key}"


def setting_of(path: Path) -> str | None:
    """The `paths.*` setting of the deepest remembered root holding `path`, or None."""
    path = Path(os.path.abspath(path))
    best = max((root for root in _ROOTS if path == root or root in path.parents), key=lambda r: len(r.parts), default=None)
    return _ROOTS[best] if best is not None else None


def no_space_errno(exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `exc` says the disk (or quota) is full, else None."""
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None:  # an OSError built from a message only
            code = _errno_in(str(exc))
    elif type(exc).__name__ == "SafetensorError":  # safetensors' Rust writer: "... (os error 28)"
        code = _errno_in(str(exc))
    else:
        return None
    return code if code in NO_SPACE else None


def _errno_in(message: str) -> int | None:
    match = _OS_ERROR.search(message)
    return int(match.group(1) or match.group(2)) if match else None


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a file about to be written will live)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing ancestor)."""
    probe = existing_ancestor(path)
    while not os.path.ismount(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem holding `path`."""
    return int(shutil.disk_usage(existing_ancestor(path)).free)


def _no_free_inodes(path: Path) -> bool:
    """True when the filesystem holding `path` can hold no more files (all its inodes are used)."""
    stats = os.statvfs(existing_ancestor(path))
    return stats.f_files > 0 and stats.f_favail == 0


def remove_partial(paths: tuple[Path, ...]) -> None:
    """Delete what a failed write left under temporary names (files or folders); missing ones are fine."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def space_error(path: Path, needed: int, code: int) -> TokenJourneyError:
    """The one-line error of a write of `needed` bytes to `path` that failed with `code` (ENOSPC, EDQUOT)."""
    mount = mount_point(path)
    inodes = " (no free inodes: too many files)" if _no_free_inodes(path) else ""
    setting = setting_of(path)
    elsewhere = f" (or point {setting} elsewhere)" if setting else " (or write this output elsewhere)"
    return TokenJourneyError(
        f"{NO_SPACE[code]} on {mount}{inodes} writing {path}: needs about {needed:,} bytes, {free_bytes(path):,} free; "
        f"free space{elsewhere} and rerun — complete files are kept and the rerun continues"
    )


@contextmanager
def writing(path: Path | str, needed: int | Callable[[], int], *temps: Path) -> Iterator[None]:
    """Guard the write of `path` (`needed` bytes, or a function estimating them) done in the block.

    On any failure the `temps` (files or folders the block writes before renaming into place) are
    removed; a full disk or quota becomes the one-line `TokenJourneyError` of `space_error`, any
    other error is raised as it is.
    """
    try:
        yield
    except BaseException as exc:
        remove_partial(temps)
        code = no_space_errno(exc)
        if code is None:
            raise
        size = needed() if callable(needed) else needed
        raise space_error(Path(path), size, code) from exc
