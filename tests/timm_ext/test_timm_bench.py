"""The glyph benchmark protocol: variants at one seed, choice on validation, defaults over seeds, resumable."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import timm_ext.train as train_mod
from mhe_plugins.datasets.glyphs import subset_glyph_dataset
from timm_ext.bench import build_bench_parser, main, run_args, run_dir

SUBSET = Path(__file__).resolve().parents[2] / "data" / "glyphs"


def test_bench_protocol_seeds_choice_and_resume(tmp_path, monkeypatch):
    data = tmp_path / "g50"
    subset_glyph_dataset(SUBSET, data, 50)
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--data-dir", str(data), "--model-kwargs", "channels=(8,16,32,32)", "--epochs", "2",
            "--max-steps-per-epoch", "2", "--batch-size", "16", "--neck-dim", "24", "--seeds", "0", "1",
            "--variants", "linear", "mhp_plain", "mhp_neck",
            "--work-dir", str(work), "--out-dir", str(out), "--no-progress"]  # fmt: skip
    # a process that trains only the linear head leaves partial results
    main([*argv, "--run-variants", "linear"])
    res = json.loads((out / "glyphs.json").read_text())
    assert res["partial"] is True and set(res["methods"]) == {"linear"}
    assert res["methods"]["linear"]["seeds"] == [0, 1]  # linear has one candidate: its seeds run at once
    assert "PARTIAL" in (out / "glyphs.md").read_text()
    # mhp_neck is interrupted in its second epoch (2 evaluations per epoch: valid + test)
    a = build_bench_parser().parse_args(argv)
    calls, real_eval = {"n": 0}, train_mod.evaluate

    def crash(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_eval(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(run_args(a, "mhp_neck", 0, work))
    monkeypatch.setattr(train_mod, "evaluate", real_eval)
    assert run_args(a, "mhp_neck", 0, work).resume == str(run_dir(work, "mhp_neck", 0) / "last.pt")
    linear_mtime = (run_dir(work, "linear", 0) / "last.pt").stat().st_mtime
    main(argv)  # finishes the rest, resumes mhp_neck, skips linear
    assert (run_dir(work, "linear", 0) / "last.pt").stat().st_mtime == linear_mtime
    logged = (run_dir(work, "mhp_neck", 0) / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in logged] == [0, 1]

    res = json.loads((out / "glyphs.json").read_text())
    assert res["partial"] is False and set(res["methods"]) == {"linear", "mhp"}
    assert set(res["variants"]) == {"linear", "mhp_plain", "mhp_neck"}
    # the MHP default is the variant with the better last-epoch validation top-1 (never test)
    valid = {v: res["variants"][v]["valid_top1"] for v in ("mhp_plain", "mhp_neck")}
    chosen = max(valid, key=lambda v: (valid[v], v == "mhp_plain"))
    assert res["selection"]["mhp"]["chosen"] == chosen == res["methods"]["mhp"]["variant"]
    for r in res["methods"].values():
        variant = r["variant"]
        per_seed = [
            json.loads((run_dir(work, variant, s) / "summary.json").read_text())["history"][-1]["test_top1"]
            for s in (0, 1)
        ]
        assert r["seeds"] == [0, 1] and r["top1_per_seed"] == [round(v, 2) for v in per_seed]
        assert r["top1"] == pytest.approx(statistics.fmean(per_seed), abs=0.01)
        assert r["top1_std"] == pytest.approx(statistics.stdev(per_seed), abs=0.01)
        assert len(r["curve_test_top1"]) == 2 and r["epochs"] == 2
    assert res["variants"]["mhp_neck"]["head_params"] == 32 * 24 + 2 * 24 + 24 * 15 + 15
    assert res["variants"]["mhp_neck"]["neck_dim"] == 24 and res["variants"]["mhp_plain"]["neck_dim"] is None
    assert res["methods"]["linear"]["head_params"] == 32 * 50 + 50
    assert res["gaps"]["mhp"]["gap"] == pytest.approx(
        res["methods"]["mhp"]["top1"] - res["methods"]["linear"]["top1"]
    )
    md = (out / "glyphs.md").read_text()
    assert "PARTIAL" not in md and "| MHP | " in md and "| mhp_neck |" in md
    assert (out / "glyphs.png").stat().st_size > 10_000
    # a rerun finds everything finished and rewrites identical results
    main(argv)
    again = json.loads((out / "glyphs.json").read_text())
    assert again["methods"] == res["methods"] and again["variants"] == res["variants"]
    # a work dir from another schedule is refused instead of mixed in
    with pytest.raises(ValueError, match="planned for 2 epochs but --epochs is 3"):
        main([*argv[:5], "3", *argv[6:]])
    # a fresh machine (work dir gone) finds the finished runs in the committed store and trains nothing
    import shutil

    shutil.rmtree(work)
    assert sorted(p.name for p in (out / "runs" / "glyphs").iterdir())[:2] == [
        "linear_seed0.json",
        "linear_seed1.json",
    ]

    def no_training(*args, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("timm_ext.bench.train", no_training)
    main(argv)
    fresh = json.loads((out / "glyphs.json").read_text())
    assert fresh["methods"] == res["methods"] and fresh["partial"] is False
