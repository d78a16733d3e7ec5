"""Small file helpers shared by the readers and the WordNet builder.

Bundled data is stored xz-compressed, so every reader opens ``name`` or ``name.{xz,gz,bz2}``
transparently; writers go through a temporary directory so a failed run never leaves half a dataset.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

COMPRESSED_SUFFIXES = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def find_file(directory: str | Path, name: str) -> Path | None:
    """Return ``directory/name`` or its compressed variant, or None when absent."""
    base = Path(directory) / name
    if base.exists():
        return base
    for suffix in COMPRESSED_SUFFIXES:
        cand = base.with_name(base.name + suffix)
        if cand.exists():
            return cand
    return None


def open_text(path: str | Path, mode: str = "rt") -> IO[str]:
    """Open a (possibly compressed) UTF-8 text file."""
    path = Path(path)
    opener = COMPRESSED_SUFFIXES.get(path.suffix)
    if opener is not None:
        return opener(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file without their trailing newline (``\\r\\n`` tolerated)."""
    with open_text(path) as fh:
        return [line.rstrip("\r\n") for line in fh]


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
