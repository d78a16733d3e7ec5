"""Report writers of every benchmark: PARTIAL marking and the .json / .md / .png files, all written atomically.

Why one place: a report is rewritten after every finished run (so a long benchmark always has a current
one); a kill mid-write must never leave a truncated JSON or an unreadable PNG where the last good one
was, and a report of unfinished work must say so in the same words everywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..training import atomic_write, atomic_write_json, atomic_write_text

__all__ = [
    "RERUN_HINT",
    "partial_banner",
    "mark_partial",
    "say_partial",
    "report_paths",
    "write_json",
    "write_markdown",
    "pyplot",
    "save_figure",
    "write_reports",
    "portable_paths",
]

RERUN_HINT = (
    "Rerun the same command to continue (finished runs are kept in `runs/` beside this file and are not "
    "retrained)."
)


def partial_banner(partial: bool, missing: Sequence[str] | None = None, hint: str = RERUN_HINT) -> list[str]:
    """The Markdown lines that open a report of unfinished work (none for a complete one)."""
    if not partial:
        return []
    what = f"not finished yet: {', '.join(missing)}" if missing else "some planned runs have not finished"
    return [f"**PARTIAL RESULTS: {what}.**" + (f" {hint}" if hint else ""), ""]


def mark_partial(result: dict, partial: bool) -> dict:
    """``result`` with ``"partial"`` as its first entry (what a reader of the JSON sees first)."""
    return {"partial": bool(partial), **{k: v for k, v in result.items() if k != "partial"}}


def say_partial(partial: bool, say: Callable[[str], object] = print) -> None:
    if partial:
        say("results are PARTIAL: rerun the same command to continue")


#: an absolute path token (not a URL's segment, not inside a relative path)
_ABS_PATH = re.compile(r"(?<![\w.~$/:-])/[^\s,;:()\[\]{}\"'`]+")


def _machine_roots() -> tuple[str, ...]:
    """Where one machine's own files live: the working tree's top directory, the home dir, the temp dir."""
    top = Path.cwd().resolve().parts[:2]
    roots = {os.path.join(*top)} if len(top) == 2 else set()
    roots |= {str(Path.home()), "/tmp"}
    return tuple(r.rstrip("/") + "/" for r in roots if r not in ("/", ""))


def portable_paths(value: Any) -> Any:
    """``value`` (str, or JSON-like lists/dicts of them) with every absolute path of this machine's own
    files rewritten relative to the working directory (``<top>/data/x`` run from ``<top>/main`` ->
    ``../data/x``): a committed report must not carry one machine's layout. System paths stay."""
    if isinstance(value, str):
        roots = _machine_roots()

        def rel(m: re.Match) -> str:
            path = m.group(0)
            return os.path.relpath(path) if path.startswith(roots) else path

        return _ABS_PATH.sub(rel, value)
    if isinstance(value, dict):
        return {k: portable_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v) for v in value]
    return value


def report_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """``PREFIX.json``, ``PREFIX.md``, ``PREFIX.png`` (a report suffix already on ``prefix`` is replaced)."""
    p = Path(prefix)
    if p.suffix in (".json", ".md", ".png"):
        p = p.with_suffix("")
    return {ext: p.with_name(f"{p.name}.{ext}") for ext in ("json", "md", "png")}


def write_json(result: Any, path: str | os.PathLike) -> Path:
    return atomic_write_json(result, path)


def write_markdown(text: str, path: str | os.PathLike) -> Path:
    return atomic_write_text(text if text.endswith("\n") else text + "\n", path)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (the training kit's temp file + fsync + rename) and close it."""
    try:
        return atomic_write(Path(path), lambda fh: fig.savefig(fh, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)


def write_reports(
    prefix: str | os.PathLike,
    result: Any,
    markdown: str | None = None,
    plot: Callable[[Any, Path], object] | None = None,
) -> dict[str, Path]:
    """Write ``PREFIX.json`` (``result``), ``PREFIX.md`` (``markdown``) and ``PREFIX.png`` (``plot(result,
    path)``, which should end in :func:`save_figure`); the parts given as None are left alone. Paths of
    this machine's files in the JSON and Markdown are made relative (:func:`portable_paths`)."""
    paths = report_paths(prefix)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_json(portable_paths(result), paths["json"])
    if markdown is not None:
        write_markdown(portable_paths(markdown), paths["md"])
    if plot is not None:
        plot(result, paths["png"])
    return paths
