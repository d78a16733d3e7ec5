"""docs/face.md: its python blocks run verbatim; every shell command is either run here at tiny size
(``# tested: test_face_docs.py``), covered by a named test file, or marked as needing user-supplied data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from insightface_ext.recordio import write_face_rec
from insightface_ext.train import cli as train_main

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "face.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", DOC, flags=re.S)


def _commands() -> list[tuple[str, str]]:
    """(command, trailing comment) of every non-comment line of the bash blocks."""
    out = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cmd, _, note = line.partition("   # ")
            out.append((cmd.strip(), note.strip()))
    return out


def test_every_command_is_tested_or_marked():
    cmds = _commands()
    assert len(cmds) >= 10
    for cmd, note in cmds:
        assert note.startswith(("needs", "install step", "tested:")), (
            f"docs/face.md: unmarked command {cmd!r}"
        )
        for name in re.findall(r"test_\w+\.py", note):
            assert (Path(__file__).parent / name).is_file(), f"docs/face.md names a missing test {name}"


@pytest.mark.parametrize("index", range(sum(lang == "python" for lang, _ in BLOCKS)))
def test_python_blocks_run(index):
    code = [body for lang, body in BLOCKS if lang == "python"][index]
    exec(compile(code, f"docs/face.md python block {index}", "exec"), {})


def test_tested_train_commands_run_at_tiny_size(tmp_path, monkeypatch):
    import numpy as np

    rng = np.random.default_rng(0)
    write_face_rec(
        tmp_path / "rec", [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), i % 4) for i in range(16)]
    )
    cfg = tmp_path / "my_config.py"
    cfg.write_text(
        "from insightface_ext.config import base_config\nconfig = base_config()\n"
        "config.network, config.width, config.embedding_size, config.input_size = 'r18', 4, 8, 16\n"
        f"config.head_sizes, config.num_workers, config.rec = (2, 2), 0, {str(tmp_path / 'rec')!r}\n"
    )
    monkeypatch.chdir(tmp_path)
    ran = 0
    for cmd, note in _commands():
        if "test_face_docs.py" not in note:
            continue
        argv = shlex.split(cmd.replace("path/to/my_config.py", str(cfg)))
        assert argv[0] == "mhe-face-train"
        tiny = ["batch_size=4", "max_steps=2"]  # the documented command at tiny size
        argv = (
            argv[: argv.index("--set") + 1] + argv[argv.index("--set") + 1 :] + tiny
            if "--set" in argv
            else [*argv, "--set", *tiny]
        )
        res = train_main(argv[1:])
        assert res["steps"] >= 1 and (tmp_path / "work_dirs" / "x" / "model.pt").is_file()
        ran += 1
    assert ran == 2
