"""Atomic file writes: a crash or a full disk mid-write never leaves a half-written file where a good one was.

Everything is written to a hidden temporary file in the same directory, fsynced, then ``os.replace``-d.
A kill can still leave such a temporary file behind; :func:`clean_stale_tmp` removes them on the next start.
Only files with this module's own suffix (``.mhe-partial``) are ever removed: a user's ``.*.tmp`` is not ours.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy",
    "clean_stale_tmp",
    "write_error",
    "atomic_write",
    "TMP_SUFFIX",
]

TMP_SUFFIX = ".mhe-partial"


def _mode_for(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would leave: the old file's, else 0o666 less the umask
    (``mkstemp`` alone makes every result 0o600, unreadable to the rest of a shared group)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch.save wraps the OSError of a full disk in a RuntimeError
        raise write_error(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power cut after ``os.replace`` must not bring the old file back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:  # torch's writer drops the errno: ask the file system how much room is left
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        return False


def write_error(path: str | os.PathLike, exc: BaseException) -> OSError:
    """An ``OSError`` naming ``path`` that says "disk full" when that is the cause (any writer uses it)."""
    path = Path(path)
    if _is_disk_full(exc, path.parent):
        return OSError(errno.ENOSPC, f"cannot write {path}: disk full (no space left on the device)")
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OSError(code, f"cannot write {path}: {reason}")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    return atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 1 << 22) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is either the old file or the complete copy."""

    def write(fh: IO[bytes]) -> None:
        with open(src, "rb") as fin:
            while block := fin.read(chunk):
                fh.write(block)

    return atomic_write(Path(dst), write)


def clean_stale_tmp(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete temporary files a killed writer of this module left behind (``.<name>.<random>.mhe-partial``);
    returns what went. A temporary file is never the only copy of anything: its rename never happened."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".*{TMP_SUFFIX}"
    found = directory.rglob(pattern) if recursive else directory.glob(pattern)
    removed = []
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
