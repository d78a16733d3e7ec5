"""No absolute path of a build machine (``/work/...``, ``/root/...``, ``/tmp/...``, ``/home/<name>/...``) in
the package sources, the docs, the README or the data files shipped in the wheel.

Why: such a path works only where it was written; as a code default it sends every other user's data,
fonts or checkpoints to a place that does not exist (or is shared), and in shipped data it leaks a
machine's layout. System search locations such as ``/usr/share/fonts`` are fine.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mhe_plugins", "timm_ext", "xmc", "insightface_ext", "fairseq_ext")
BINARY = {".npz", ".xz", ".gz", ".bin", ".png", ".pt", ".pyc", ".so", ".tar", ".zip"}
#: an absolute path starting at the root (not a URL's or a relative path's segment)
MACHINE_PATH = re.compile(r"(?<![\w.~$/-])/(?:work|root|tmp)/|(?<![\w.~$/-])/home/[A-Za-z0-9_.-]+/")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for pkg in PACKAGES:  # sources and shipped data (mhe_plugins/data/...) alike
        files += [
            p
            for p in sorted((ROOT / pkg).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in BINARY
        ]
    return files


def find_machine_paths(files: list[Path]) -> list[str]:
    hits = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a binary file without a telling suffix
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:160]}")
    return hits


def test_no_machine_paths_in_sources_docs_and_shipped_data():
    files = scanned_files()
    assert len(files) > 50 and ROOT / "mhe_plugins" / "data" / "glyphs" / "meta.json" in files
    hits = find_machine_paths(files)
    assert not hits, "absolute paths of one machine (use a relative path or the user's cache):\n" + "\n".join(
        hits
    )


def test_the_pattern():
    for bad in ("--out /work/data/g", "default='/tmp/x'", "`/root/.cache/`", "/home/alice/fonts"):
        assert MACHINE_PATH.search(bad), bad
    for ok in ("/usr/share/fonts", "runs/tmp/x", "https://host/work/x", "~/.cache/x", "$HOME/x", "a/home/b/"):
        assert not MACHINE_PATH.search(ok), ok
