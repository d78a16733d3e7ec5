"""No absolute path of a build machine (``/work/...``, ``/root/...``, ``/tmp/...``, ``/home/<name>/...``) in
the package sources, the docs, the README, the data files shipped in the wheel or the committed benchmark
reports (every bench writes them through ``write_reports``, which makes such paths relative).

Why: such a path works only where it was written; as a code default it sends every other user's data,
fonts or checkpoints to a place that does not exist (or is shared), and in shipped data it leaks a
machine's layout. System search locations such as ``/usr/share/fonts`` are fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mhe_plugins", "timm_ext", "xmc", "insightface_ext", "fairseq_ext")
BINARY = {".npz", ".xz", ".gz", ".bin", ".png", ".pt", ".pyc", ".so", ".tar", ".zip"}
#: an absolute path starting at the root (not a URL's or a relative path's segment)
MACHINE_PATH = re.compile(r"(?<![\w.~$/-])/(?:work|root|tmp)/|(?<![\w.~$/-])/home/[A-Za-z0-9_.-]+/")


def _not_ignored() -> set[Path] | None:
    """Files git would commit (tracked or new, not ignored): a local corpus under an ignored folder of the
    package is neither shipped nor committed. None when git cannot tell (then every file is scanned)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return {ROOT / line for line in out.splitlines() if line}


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    results = ROOT / "benchmarks" / "results"
    files += sorted(p for p in results.iterdir() if p.suffix in (".md", ".json"))
    for pkg in PACKAGES:  # sources and shipped data (mhe_plugins/data/...) alike
        files += [
            p
            for p in sorted((ROOT / pkg).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in BINARY
        ]
    keep = _not_ignored()
    return files if keep is None else [f for f in files if f in keep]


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


def test_reports_are_written_with_relative_paths(tmp_path, monkeypatch):
    from mhe_plugins.bench.report import portable_paths, write_reports

    monkeypatch.chdir(tmp_path)
    data = str(tmp_path.parent / "data" / "set")  # this machine's own file, outside the working dir
    res = {"data_dir": data, "notes": [f"model {data}/model, mean"], "font": "/usr/share/fonts/a.ttf"}
    write_reports(tmp_path / "out" / "r", res, f"trained on `{data}`")
    text = (tmp_path / "out" / "r.json").read_text() + (tmp_path / "out" / "r.md").read_text()
    assert not MACHINE_PATH.search(text) and "../data/set" in text and "/usr/share/fonts/a.ttf" in text
    assert portable_paths("https://host/tmp/x and runs/tmp/y") == "https://host/tmp/x and runs/tmp/y"
