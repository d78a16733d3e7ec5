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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from mhe_plugins.datasets.lines import iter_clean_lines

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


class InputFileError(ValueError):
    """A data or model file cannot be read as it should; the message names the file, the line and the value."""


# what a corrupt or truncated .xz/.gz/.bz2 stream raises
DECOMPRESS_ERRORS = (lzma.LZMAError, EOFError, gzip.BadGzipFile, zlib.error, OSError)


def open_text(path: str | Path, mode: str = "rt") -> IO[str]:
    """Open a (possibly compressed) UTF-8 text file; a leading BOM is dropped when reading
    (``utf-8-sig``): left in place it would glue itself to the first token, e.g. a phantom label.
    Reading, only ``\n`` ends a line and nothing is translated (``newline="\n"``): universal newlines
    turned a stray ``\r`` into a line break, splitting one document in two (see :mod:`mhe_plugins.datasets.lines`)."""
    path = Path(path)
    enc, newline = ("utf-8-sig", "\n") if "r" in mode else ("utf-8", None)
    opener = COMPRESSED_SUFFIXES.get(path.suffix)
    if opener is not None:
        return opener(path, mode, encoding=enc, newline=newline)
    return open(path, mode, encoding=enc, newline=newline)


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a (possibly compressed) file for reading bytes."""
    path = Path(path)
    return COMPRESSED_SUFFIXES.get(path.suffix, open)(path, "rb")


def _undecodable_line(path: Path) -> str:
    """Slow path after a UnicodeDecodeError: the first line that is not UTF-8, with its bad bytes."""
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.end + 8]
                return f"{path}:{lineno}: not UTF-8 text (bytes {bad!r} at column {exc.start + 1})"
    return f"{path}: not UTF-8 text"


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file without their ``\\n`` / ``\\r\\n``, by the rules of :mod:`mhe_plugins.datasets.lines`:
    only ``\\n`` ends a line, a leading BOM is dropped; a ``\\r`` not before ``\\n`` or a BOM later in the
    file (two files concatenated) is an :class:`InputFileError` naming file:line, never a silent extra line
    or a phantom label. Undecodable bytes and corrupt compressed streams are errors naming the file and line.
    """
    path = Path(path)
    lines: list[str] = []
    fh = open_text(path)  # a missing file raises FileNotFoundError here, not a decompression error
    try:
        with fh:
            for line in iter_clean_lines(fh, str(path), InputFileError):
                lines.append(line)
    except UnicodeDecodeError as exc:
        raise InputFileError(_undecodable_line(path)) from exc
    except DECOMPRESS_ERRORS as exc:
        raise InputFileError(
            f"{path}:{len(lines) + 1}: cannot decompress ({type(exc).__name__}: {exc}); "
            f"the file is corrupt or truncated"
        ) from exc
    return lines


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
