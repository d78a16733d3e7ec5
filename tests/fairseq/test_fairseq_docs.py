"""docs/fairseq.md only shows what the tests run: every flag of every fairseq / plugin command in its code
blocks is used by a test (tiny sizes), or the block says it needs data the user supplies."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fairseq.md"
RUNNERS = ("test_fairseq_e2e.py", "test_fairseq_bench.py", "test_fairseq_datasets.py")
NEEDS_DATA = ("Needs the Debian packages", "Needs the full corpus")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(paragraph before the block, block) for every ```bash block."""
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        before = text[: m.start()].rstrip().rsplit("\n\n", 1)[-1]
        out.append((before, m.group(1).replace("\\\n", " ")))
    return out


def test_every_documented_flag_is_exercised_by_a_test():
    tests = "\n".join((Path(__file__).parent / f).read_text() for f in RUNNERS)
    blocks = _blocks(DOC.read_text())
    assert len(blocks) >= 5
    checked = 0
    for before, block in blocks:
        if any(marker in before for marker in NEEDS_DATA):
            continue
        for line in block.splitlines():
            if not re.search(r"(fairseq-|fairseq_ext)", line):
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line):
                assert f'"{flag}"' in tests or f"{flag} " in tests, (
                    f"docs/fairseq.md: {flag} in {line.strip()!r}"
                )
                checked += 1
    assert checked > 40
