"""Packaging: the wheel carries the bundled data and version ranges, its demos run outside the repo, the
console scripts name the extra they miss, and the face stand-in config trains on the bundled glyphs."""

from __future__ import annotations

import json
import lzma
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mhe_plugins import entry
from mhe_plugins.bundled import BUNDLED, DATA_ROOT, bundled_data

REPO = Path(__file__).resolve().parents[1]
#: declared exactly by fairseq-fixed 0.12.3.1 itself (installed --no-deps, so we declare them for it)
EXACT_ALLOWED = {"hydra-core", "omegaconf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the source tree (the build writes build/ and *.egg-info)."""
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", ".*cache")
    shutil.copytree(REPO, src / "repo", symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("whl")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        ".",
    ]
    subprocess.run(
        cmd, cwd=src / "repo", check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    )
    (whl,) = out.glob("mhe_plugins-*.whl")
    return whl


def test_repo_data_link_and_resolver():
    assert (REPO / "data").resolve() == DATA_ROOT
    for name in BUNDLED:
        assert bundled_data(name) == DATA_ROOT / name and any(bundled_data(name).iterdir())
    with pytest.raises(ValueError, match="unknown bundled data set 'nope'"):
        bundled_data("nope")


def test_wheel_has_data_ranges_and_checked_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    repo_files = {
        p.relative_to(REPO).as_posix()
        for p in DATA_ROOT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert repo_files and repo_files <= names, sorted(repo_files - names)
    assert "mhe_plugins/data/glyphs/verify_test.bin" in names
    assert not any(n.startswith(("data/", "tests/", "runs/")) for n in names)

    reqs = [r.split(";")[0].strip() for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)]
    assert reqs
    pinned = {re.split(r"[ =<>;\[]", r)[0] for r in reqs if "==" in r}
    assert pinned <= EXACT_ALLOWED, f"exact pins in metadata: {pinned - EXACT_ALLOWED}"
    for name in ("torch", "numpy", "scipy", "torchvision", "timm", "transformers"):
        found = [r for r in reqs if re.match(rf"{name}\b", r) and not r.startswith(f"{name}-")]
        assert found and all(">=" in req for req in found), found  # one entry per extra that needs it

    lines = [ln for ln in scripts.splitlines() if "=" in ln and not ln.startswith("[")]
    assert len(lines) >= 13
    for ln in lines:
        prog, target = (s.strip() for s in ln.split("="))
        module, func = target.split(":")
        if prog != "mhe-bench":  # the core benchmark needs no extra
            assert module == "mhe_plugins.entry", ln
            assert callable(getattr(entry, func)), ln


def test_constraints_cover_every_requirement_exactly():
    pins = {}
    for ln in (REPO / "constraints.txt").read_text().splitlines():
        if ln and not ln.startswith("#"):
            name, version = ln.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the package itself supports 3.10)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]
    declared = {re.split(r"[ ><=!~\[;]", r)[0] for r in reqs} - {"mhe-plugins"}
    assert {"torch", "numpy", "timm", "transformers", "hydra-core", "setuptools"} <= declared
    missing = {d for d in declared if d.lower().replace("_", "-") not in pins}
    assert not missing, f"requirements without an exact tested version in constraints.txt: {missing}"
    assert "fairseq-fixed" in pins  # the Makefile builds it through the constraints


def test_wheel_demos_run_outside_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # .pyc files show what ran
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        return p

    small = tmp_path / "wn_small"  # the first documents of the bundled WordNet-XMC: a fast real run
    small.mkdir()
    for split, n in (("train", 1500), ("valid", 200), ("test", 200)):
        for kind in ("texts", "labels"):
            with lzma.open(
                bundled_data("wordnet_xmc") / f"{split}_{kind}.txt.xz", "rt", encoding="utf-8"
            ) as fh:
                lines = [next(fh) for _ in range(n)]
            (small / f"{split}_{kind}.txt").write_text("".join(lines), encoding="utf-8")
    run("-m", "xmc.demo", "--data-dir", str(small), "--epochs", "1", "--max-steps", "2", "--threads", "1")
    rows = json.loads((cwd / "runs" / "xmc_demo" / "comparison.json").read_text())
    assert (
        set(rows) == {"mhc", "flat"} and rows["flat"]["classifier_params"] > rows["mhc"]["classifier_params"]
    )
    demo = run("-m", "mhe_plugins.demo", "--skip-xmc", "--num-classes", "4000", "--dim", "8", "--batch", "4")
    heads = json.loads((cwd / "runs" / "demo" / "heads.json").read_text())
    assert heads["methods"]["dense"]["params"] == 8 * 4000 + 4000
    assert (cwd / "runs" / "demo" / "demo.png").stat().st_size > 10_000
    assert "fewer parameters" in demo.stdout and str(cwd / "runs" / "demo") in demo.stdout
    assert not (site / "runs").exists() and not list(site.glob("*/runs"))
    for pkg in ("mhe_plugins", "xmc"):  # the installed copy ran, not the repository's
        assert list((site / pkg / "__pycache__").glob("*.pyc")), pkg


@pytest.mark.parametrize(
    ("script", "gone", "must", "must_not"),
    [
        ("xmc", {"sklearn"}, ["mhe-xmc", "sklearn", "pip install 'mhe-plugins[xmc]'"], [entry.FAIRSEQ_BUILD]),
        ("timm_export", {"onnxscript"}, ["[timm]", "onnxscript", "pip install 'mhe-plugins[timm]'"], []),
        ("face_train", {"PIL"}, ["mhe-face-train", "pip install 'mhe-plugins[face]'"], []),
        (
            "fairseq_train",
            {"fairseq", "fairseq_cli"},
            [entry.FAIRSEQ_BUILD, "--no-build-isolation"],
            ["pip install 'mhe"],
        ),
        (
            "fairseq_generate",
            {"hydra", "fairseq"},
            ["pip install 'mhe-plugins[fairseq]'", entry.FAIRSEQ_BUILD],
            [],
        ),
    ],
)
def test_console_script_names_missing_extra(monkeypatch, capsys, script, gone, must, must_not):
    real = entry.importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda name: None if name in gone else real(name))
    imported = set(sys.modules)
    with pytest.raises(SystemExit) as exc:
        getattr(entry, script)()
    assert exc.value.code == entry.EXIT_MISSING_EXTRA == 3
    err = capsys.readouterr().err
    for text in must:
        assert text in err, err
    for text in must_not:
        assert text not in err, err
    assert all(m in err for m in gone)
    assert not any(m.startswith(("xmc.cli", "timm_ext.export", "insightface_ext.train", "fairseq_ext.cli"))
                   for m in set(sys.modules) - imported)  # fmt: skip


def test_console_script_runs_target_when_extra_present(capsys):
    with pytest.raises(SystemExit) as exc:
        entry.run("mhe-xmc", "xmc", "xmc.cli:main", ["--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_bundled_verification_pairs_are_glyph_pairs():
    from mhe_plugins.datasets.glyph_pairs import glyph_pairs
    from mhe_plugins.datasets.glyphs import load_glyph_split

    images, labels, fonts = load_glyph_split(bundled_data("glyphs"), "test")
    pairs, issame = glyph_pairs(labels, fonts, 300, 300, seed=0)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert (same == issame).all() and issame.sum() == 300
    assert (fonts[pairs[issame, 0]] != fonts[pairs[issame, 1]]).all()
    with open(bundled_data("glyphs") / "verify_test.bin", "rb") as fh:
        bins, issame_file = pickle.load(fh)
    assert issame_file == issame.tolist() and all(isinstance(b, bytes) for b in bins)
    from insightface_ext.verification import load_bin

    decoded, flags = load_bin(bundled_data("glyphs") / "verify_test.bin", image_size=32, channels=1)
    assert (flags == issame).all()
    np.testing.assert_array_equal(decoded, images[pairs.reshape(-1)])


def test_face_glyph_config_trains_and_verifies_on_bundled_data(tmp_path):
    from insightface_ext.config import apply_overrides, load_config
    from insightface_ext.train import train

    cfg = load_config("glyphs_r18_mhs")
    assert cfg.rec == f"glyphs:{bundled_data('glyphs')}:train" and cfg.num_classes == 500
    apply_overrides(cfg, ["max_steps=2", "batch_size=16", "width=8"])
    cfg.output = str(tmp_path / "face")
    res = train(cfg)
    assert res["steps"] == 2
    val = res["val"]["verify_test"]
    assert 0.0 <= val["acc10fold"] <= 100.0 and np.isfinite(val["acc10fold"])
