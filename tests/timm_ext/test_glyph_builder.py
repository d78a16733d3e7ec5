"""The font fetcher lives in the adapter, not the core: its cache comes from the user's environment, it fetches
only what is missing, and says what to do where apt-get is unavailable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import timm_ext.glyph_builder as gb

REPO = Path(__file__).resolve().parents[2]


def test_default_fonts_dir_follows_the_environment(tmp_path, monkeypatch):
    assert gb.default_fonts_dir({"MHE_FONTS_DIR": str(tmp_path / "f")}) == tmp_path / "f"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert gb.default_fonts_dir(env) == tmp_path / "xdg" / "mhe-plugins" / "fonts"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gb.default_fonts_dir({}) == tmp_path / "home" / ".cache" / "mhe-plugins" / "fonts"


def test_ensure_fonts_fetches_only_what_is_missing(tmp_path, monkeypatch):
    for pkg in ("fonts-a", "fonts-b"):
        (tmp_path / pkg).mkdir()
    monkeypatch.setattr(gb.subprocess, "run", lambda *a, **k: pytest.fail("fetched a package that is there"))
    assert gb.ensure_fonts(tmp_path, ("fonts-a", "fonts-b")) == tmp_path
    monkeypatch.setattr(gb.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"\['fonts-c'\] are not in .* apt-get/dpkg are unavailable"):
        gb.ensure_fonts(tmp_path, ("fonts-a", "fonts-c"))
    assert gb.main(["--fonts-dir", str(tmp_path), "--packages", "fonts-a", "--check"]) == 0
    assert gb.main(["--fonts-dir", str(tmp_path), "--packages", "fonts-c", "--check"]) == 1


def test_the_core_glyph_module_runs_no_system_tool():
    """mhe_plugins.datasets.glyphs reads and renders; fetching (apt-get, dpkg) is the builder's job."""
    src = (REPO / "mhe_plugins" / "datasets" / "glyphs.py").read_text(encoding="utf-8")
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(src))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & {"subprocess", "shutil"} and "apt-get" not in src
