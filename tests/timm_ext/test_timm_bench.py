"""The glyph benchmark driver: JSON schema of the issue, markdown table, PNG, resumable reruns."""

from __future__ import annotations

import json
from pathlib import Path

from mhe_plugins.datasets.glyphs import subset_glyph_dataset
from timm_ext.bench import main

SUBSET = Path(__file__).resolve().parents[2] / "data" / "glyphs"


def test_bench_writes_json_md_png_and_skips_finished_methods(tmp_path):
    data = tmp_path / "g50"
    subset_glyph_dataset(SUBSET, data, 50)
    argv = ["--data-dir", str(data), "--model-kwargs", "channels=(8,16,32,32)", "--epochs", "1",
            "--max-steps-per-epoch", "2", "--batch-size", "16", "--sampled-groups", "3",
            "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    main(argv)
    res = json.loads((tmp_path / "out" / "glyphs.json").read_text())
    assert set(res["methods"]) == {"linear", "mhp", "mhc", "mhs"}
    for r in res["methods"].values():
        assert {"top1", "top5", "head_params", "epoch_s"} <= set(r)
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0 and r["epoch_s"] > 0
    m = res["methods"]
    assert m["mhp"]["head_sizes"] == [8, 7] and m["linear"]["head_sizes"] is None
    assert m["linear"]["head_params"] == 32 * 50 + 50 and m["mhp"]["head_params"] == 32 * 15 + 15
    md = (tmp_path / "out" / "glyphs.md").read_text()
    assert md.count("\n| ") == 5 and "| MHP | 8x7 |" in md  # header + 4 methods
    assert (tmp_path / "out" / "glyphs.png").stat().st_size > 10_000
    # a rerun finds every method finished and only rewrites the reports
    mtime = (tmp_path / "work" / "mhp" / "last.pt").stat().st_mtime
    main(argv)
    assert (tmp_path / "work" / "mhp" / "last.pt").stat().st_mtime == mtime
    assert json.loads((tmp_path / "out" / "glyphs.json").read_text())["methods"] == res["methods"]
