"""Atomic file writes: a crash or a full disk mid-write never leaves a half-written file where a good one was.

Everything is written to a hidden temporary file in the same directory, fsynced, then ``os.replace``-d.
A kill can still leave such a temporary file behind; :func:`clean_stale_tmp` removes them on the next start.
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

__all__ = ["atomic_save", "atomic_write_text", "atomic_write_json", "atomic_copy", "clean_stale_tmp"]

_TMP_SUFFIX = ".tmp"


def _mode_for(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would leave: the old file's, else 0o666 less the umask
    (``mkstemp`` alone makes every result 0o600, unreadable to the rest of a shared group)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_replace(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        hint = " (disk full?)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}{hint}") from exc
    except RuntimeError as exc:  # torch.save wraps the OSError of a full disk in a RuntimeError
        raise OSError(errno.EIO, f"cannot write {path}: {exc}") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_replace(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = 1 << 22) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is either the old file or the complete copy."""

    def write(fh: IO[bytes]) -> None:
        with open(src, "rb") as fin:
            while block := fin.read(chunk):
                fh.write(block)

    return _atomic_replace(Path(dst), write)


def clean_stale_tmp(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete temporary files a killed writer left behind (``.<name>.<random>.tmp``); returns what went."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".*{_TMP_SUFFIX}"
    found = directory.rglob(pattern) if recursive else directory.glob(pattern)
    removed = []
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
