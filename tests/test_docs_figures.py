"""Every figure in a result table of README.md and docs/*.md comes from a stored run.

A result table is preceded by a marker naming the stored report(s) it quotes:
``<!-- figures: benchmarks/results/xmc_wordnet.md benchmarks/results/xmc_foldoc.md -->``. Each figure of its
data rows (a number with a decimal point, or of three or more digits) must appear in those reports, which
the benchmarks write from their ``.json`` run stores. A report marked PARTIAL may be quoted only by a marker
that says ``partial`` and a table whose caption says PARTIAL. A table with decimal figures and no marker is
an error; tables that hold no measured result say so: ``<!-- figures: none (why) -->``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*figures:\s*(.*?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")


def figures(text: str) -> set[str]:
    """Numbers that identify a result: with a decimal point, or at least three digits (commas dropped)."""
    out = set()
    for tok in NUMBER.findall(text.replace("**", "").replace("−", "-")):
        plain = tok.replace(",", "").lstrip("-")
        if "." in plain or len(plain) >= 3:
            out.add(plain)
    return out


def tables(path: Path) -> list[tuple[int, str | None, list[str], list[str]]]:
    """(line, marker text or None, caption lines above, data rows) of every markdown table in ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    in_code = False
    while i < len(lines):
        if lines[i].startswith("```"):
            in_code = not in_code
        if (
            not in_code
            and lines[i].startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|[\s:|-]+\|$", lines[i + 1])
        ):
            start = i
            marker = None
            for back in range(start - 1, max(-1, start - 8), -1):
                m = MARKER.search(lines[back])
                if m:
                    marker = m.group(1)
                    break
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            found.append((start + 1, marker, lines[max(0, start - 8) : start], rows))
            continue
        i += 1
    return found


CASES = [(p, t) for p in DOCS for t in tables(p)]


@pytest.mark.parametrize(("path", "table"), CASES, ids=[f"{p.name}:{t[0]}" for p, t in CASES])
def test_result_tables_quote_stored_runs(path, table):
    line, marker, caption, rows = table
    where = f"{path.relative_to(ROOT)}:{line}"
    decimals = [f for f in figures("\n".join(rows)) if "." in f]
    if marker is None:
        assert not decimals, (
            f"{where}: a table with figures {sorted(decimals)[:5]} has no <!-- figures: ... --> marker"
        )
        return
    if marker.startswith("none"):
        return
    words = marker.split()
    partial_ok = "partial" in words
    sources = [ROOT / w for w in words if w != "partial"]
    assert sources, f"{where}: the marker names no report"
    stored: set[str] = set()
    for src in sources:
        assert src.is_file(), f"{where}: {src.relative_to(ROOT)} does not exist"
        text = src.read_text(encoding="utf-8")
        if "PARTIAL RESULTS" in text:
            assert partial_ok and any("PARTIAL" in c for c in caption), (
                f"{where} quotes the PARTIAL report {src.name} as final"
            )
        stored |= figures(text)
    for row in rows:
        missing = sorted(figures(row) - stored)
        assert not missing, (
            f"{where}: {missing} in row {row[:80]!r} appear in none of {[s.name for s in sources]}"
        )


def test_an_altered_figure_is_caught(tmp_path):
    """The check itself: change one digit of a quoted figure and it fails."""
    marked = [(p, t) for p, t in CASES if t[1] and not t[1].startswith("none")]
    assert marked, "no marked result table found"
    path, (line, marker, caption, rows) = marked[0]
    row = next(r for r in rows if any("." in f for f in figures(r)))
    fig = sorted(f for f in figures(row) if "." in f)[0]
    altered = row.replace(fig, fig[:-1] + str((int(fig[-1]) + 1) % 10), 1)
    stored = set().union(*(figures((ROOT / w).read_text()) for w in marker.split() if w != "partial"))
    assert not figures(altered) <= stored or altered == row
