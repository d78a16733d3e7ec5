"""Every ``mhe-*`` command that README or docs/ name is a console script the package installs, and the
package ships its license."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_documented_commands_are_installed_scripts():
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {}
    for path in texts:
        pattern = r"(?<![\w/.-])(mhe-[a-z]+(?:-[a-z]+)*)(?![-*\w])"  # "mhe-face-*" names a family
        for m in re.finditer(pattern, path.read_text(encoding="utf-8")):
            named.setdefault(m.group(1), f"{path.name}")
    named.pop("mhe-plugins", None)  # the distribution's own name
    missing = {cmd: where for cmd, where in named.items() if cmd not in scripts}
    assert not missing, f"documented but not installed: {missing}"


def test_license_is_shipped_and_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    setuptools_req = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(setuptools_req.split(">=")[1]) >= 77  # PEP 639 license strings need setuptools 77
