"""The output-folder policy every trainer follows: never write a new run over an old one by accident."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .atomic import clean_stale_tmp

__all__ = ["prepare_output_dir", "RunExistsError"]


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


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
    and starts fresh; neither raises :class:`RunExistsError` naming the flags to pass. Temporary files left
    by a killed writer are deleted either way. Only the main process touches the disk.
    """
    out = Path(output)
    if not main_process:
        return out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
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
