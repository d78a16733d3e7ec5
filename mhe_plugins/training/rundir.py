"""The output-folder policy every trainer follows: never write a new run over an old one by accident."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from .atomic import clean_stale_tmp

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the folder policy still applies
    fcntl = None  # type: ignore[assignment]

__all__ = ["prepare_output_dir", "RunExistsError", "RunLockedError", "lock_run_dir", "release_run_locks"]

LOCK_NAME = ".mhe-run.lock"
_HELD: dict[Path, int] = {}  # folder -> fd of the lock this process holds


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


class RunLockedError(RuntimeError):
    """Another live process is training into the same output folder."""


def lock_run_dir(out: str | os.PathLike) -> Path:
    """Take the folder's advisory lock for this process (re-entrant) or raise :class:`RunLockedError`.

    ``flock`` dies with its process, so a kill never leaves a stale lock behind; the lock file itself (a
    hidden file holding the owner's pid and host, for the message) is left in place and reused.
    """
    folder = Path(out).resolve()
    if folder in _HELD or fcntl is None:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{Path(out)} is in use by another trainer ({owner}); wait for it to finish or choose another "
            f"output folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[folder] = fd
    return folder


def release_run_locks() -> None:
    """Release every run-folder lock this process holds (trainers call it when they return or fail)."""
    while _HELD:
        _, fd = _HELD.popitem()
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def prepare_output_dir(
    output: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    run_files: Sequence[str],
    resume_flag: str = "--resume",
    overwrite_flag: str = "--overwrite",
    main_process: bool = True,
) -> Path:
    """Create ``output`` for a run and return it.

    ``run_files`` are the names or glob patterns whose presence means "a run lives here". With such a file
    present: ``resume`` continues it; ``overwrite`` deletes exactly those files (nothing else in the folder)
    and starts fresh; neither raises :class:`RunExistsError` naming the flags to pass. The main process
    first takes the folder's lock (:func:`lock_run_dir`), so a second trainer on the same folder is refused
    before anything is touched. Temporary files left by this project's killed writers are deleted either way
    (only those: see :func:`clean_stale_tmp`). Only the main process touches the disk.
    """
    out = Path(output)
    if not main_process:
        return out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out)
    found = sorted({p for pattern in run_files for p in out.glob(pattern)})
    if found and not resume:
        if not overwrite:
            raise RunExistsError(
                f"{out} already holds a training run ({found[0].name}): pass {resume_flag} to continue it "
                f"or {overwrite_flag} to start over"
            )
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    clean_stale_tmp(out)
    return out
