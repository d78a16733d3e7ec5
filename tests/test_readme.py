"""The README's Python blocks run as written (the core API tour)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_blocks_run(index, capsys):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
    assert "top1" in capsys.readouterr().out or index > 0


def test_readme_has_the_core_api_block():
    assert BLOCKS and "build_head" in BLOCKS[0]
