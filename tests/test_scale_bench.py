"""``python -m mhe_plugins.bench scale`` end to end at a tiny N: every method trains in its own worker
process and is stored; a rerun skips finished runs; a run that cannot allocate is recorded as "oom" with
the allocator's message (never a crash); the report is PARTIAL while cells are missing."""

from __future__ import annotations

import json

import pytest

from mhe_plugins.bench import scale as scale_mod
from mhe_plugins.bench.__main__ import main
from mhe_plugins.bench.scale import DEFAULTS, parse_method, plan, run_key
from mhe_plugins.bench.scale_report import write_scale_report
from mhe_plugins.bench.scale_train import METHODS, estimate_bytes, mhp_heads_for
from mhe_plugins.bench.store import RunStore

TINY = ["--num-classes", "2000", "--train-per-class", "2", "--epochs", "1", "--eval-examples", "300",
        "--batch", "128", "--hidden", "32", "--embed-dim", "16", "--threads", "1", "--mhc-hidden", "16",
        "--log-every", "5"]  # fmt: skip


def _args(tmp_path, *extra):
    return ["scale", *TINY, "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *extra]


@pytest.mark.slow
def test_a_run_is_stored_then_a_rerun_skips_it_then_oom_is_recorded(tmp_path, monkeypatch):
    # every method end to end: test_scale_docs.py (the documented command at tiny size)
    main(_args(tmp_path, "--methods", "mhs", "--checkpoint-every", "1e-6"))  # a checkpoint every step
    assert not list((tmp_path / "work").glob("*/ckpt-rank*.pt"))  # the stored run's checkpoints are gone
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert res["partial"] is False and res["missing"] == []
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"oracle", "mhs"} and rows["mhs"]["status"] == "ok"
    assert rows["mhs"]["head_sizes"] == [250, 8] and rows["mhs"]["epochs_done"] == 1.0
    logs = list((tmp_path / "work").glob("mhs-*/log.jsonl"))
    assert logs and "examples_per_s" in logs[0].read_text()

    def no_worker(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(scale_mod.subprocess, "run", no_worker)
    main(_args(tmp_path, "--methods", "mhs"))  # every cell is in the store: nothing runs
    monkeypatch.undo()

    # 1 GiB for the whole worker; a 400k-wide embedding needs more: the allocation fails, measured
    main(_args(tmp_path, "--methods", "linear@embed_dim=400000", "--memory-limit", "1.0"))
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    oom = next(r for r in res["rows"] if r["label"] == "linear@embed_dim=400000")
    assert oom["status"] == "oom" and "alloc" in oom["error"].lower(), oom
    assert "oom" in (tmp_path / "out" / "scale.md").read_text()
    rec = RunStore(tmp_path / "out" / "runs" / "scale").load(oom["name"])
    assert rec["memory_limit_total_bytes"] == 2**30
    assert scale_mod._done(2**30)(rec) and not scale_mod._done(2**31)(rec)  # a larger limit retries it


def test_method_overrides_and_run_names():
    assert parse_method("mhs@head_optim=lazy_sgd,mhs_group=16") == (
        "mhs",
        {"head_optim": "lazy_sgd", "mhs_group": 16},
    )
    assert parse_method("mhp@tree_aligned=true")[1] == {"tree_aligned": True}
    for bad in ("nope", "mhs@bogus=1", "mhs@mhs_group"):
        with pytest.raises(ValueError):
            parse_method(bad)
    cells = plan(dict(DEFAULTS), [1000, 5000], ["mhs", "mhp", "mhs@mhs_group=16"], [5000], 2)
    labels = [(c["label"], c["spec"]["num_classes"], c["spec"]["world"]) for c in cells]
    assert labels[:4] == [
        ("oracle", 1000, 1),
        ("mhs", 1000, 1),
        ("mhp", 1000, 1),
        ("mhs@mhs_group=16", 1000, 1),
    ]
    assert ("mhs", 5000, 2) in labels and ("mhp", 5000, 2) not in labels
    names = [c["name"] for c in cells]
    assert len(set(names)) == len(names)
    # a method that changes the held-out task gets its own oracle; one that changes only training does not
    task = plan(dict(DEFAULTS), [1000], ["mhp@tree_aligned=true", "mhs@train_per_class=30"], [], 1)
    assert [c["label"] for c in task] == [
        "oracle",
        "oracle@tree_aligned=True",
        "mhp@tree_aligned=true",
        "mhs@train_per_class=30",
    ]
    assert task[1]["spec"]["tree_aligned"] is True and task[0]["name"] == cells[0]["name"]
    mhs = next(c for c in cells if c["label"] == "mhs")["spec"]
    assert mhs["head_optim"] == scale_mod.SPARSE_OPTIM and mhs["head_lr"] == scale_mod.HEAD_LR
    oracle = cells[0]["spec"]
    assert "lr" not in oracle and oracle["noise"] == DEFAULTS["noise"]  # the oracle's key is the data's
    assert mhp_heads_for(10**5) == 2 and mhp_heads_for(10**7) == 3
    est = {
        m: estimate_bytes({**mhs, "method": m, "num_classes": 10**7, "head_optim": "adam"}) for m in METHODS
    }
    assert est["linear"] > 24 * 2**30 > est["mhs"] and est["mhp"] < 2**30
    # --mhc-sparse: MHC's node tables get row-sparse gradients and a lazy fp32 Adam; only MHC carries it, and
    # runs stored before the setting existed (mhc_sparse false) keep their names
    sparse = plan({**DEFAULTS, "mhc_sparse": True}, [1000], ["mhc", "mhs", "mhc@head_optim=adam"], [], 1)
    by = {c["label"]: c for c in sparse}
    assert by["mhc"]["spec"]["head_optim"] == "lazy_adam" and by["mhc"]["spec"]["mhc_sparse"] is True
    assert by["mhs"]["spec"]["mhc_sparse"] is False and by["mhs"]["name"] == next(
        c["name"] for c in cells if c["label"] == "mhs" and c["spec"]["num_classes"] == 1000
    )
    assert by["mhc@head_optim=adam"]["spec"]["head_optim"] == "adam"
    dense_mhc = plan(dict(DEFAULTS), [1000], ["mhc"], [], 1)[1]
    assert dense_mhc["spec"]["head_optim"] == "adam" and "mhc_sparse" not in scale_mod.run_key(
        dense_mhc["spec"]
    )
    assert dense_mhc["name"] != by["mhc"]["name"]


def test_report_is_partial_with_missing_cells_and_checks_say_not_measured(tmp_path):
    cells = plan(dict(DEFAULTS), [1000, 10**7], ["mhs"], [], 1)
    store = RunStore(tmp_path / "store")
    for c, top1 in zip(cells[:2], (80.0, 76.0)):
        rec = {"status": "ok", "top1": top1, "top5": 99.0, "key": run_key(c["spec"])}
        if c["spec"]["method"] != "oracle":
            rec.update(train_examples_per_s=1e4, epoch_s=10.0, peak_rss_bytes=2**30, head_param_bytes=100,
                       head_state_bytes=50, topk_queries_per_s=500.0, wall_s=20.0, epochs_done=2.0)  # fmt: skip
        store.save(c["name"], rec)
    meta = {"settings": dict(DEFAULTS), "environment": {"machine": "test", "memory_limit_bytes": 2**34}}
    res = write_scale_report(tmp_path / "scale", cells, store, meta)
    assert res["partial"] is True and set(res["missing"]) == {c["name"] for c in cells[2:]}
    row = next(r for r in res["rows"] if r["label"] == "mhs")
    assert row["pct_of_oracle"] == pytest.approx(95.0)
    md = (tmp_path / "scale.md").read_text()
    assert md.count("PARTIAL RESULTS") == 1 and cells[2]["name"] in md
    assert "not measured" in md and "| mhs | 1 | ok | 76.00 |" in md
    assert json.loads((tmp_path / "scale.json").read_text())["partial"] is True
    assert (tmp_path / "scale.png").is_file()


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["pfc", "mhs@codes=pifa", "mhc@mhc_sparse=true"])
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_if_never_killed(tmp_path, monkeypatch, method):
    # pfc: random negatives + bf16 stochastic rounding; mhs with learned codes: the codes come back from the
    # checkpoint (never learned twice, so a resumed run cannot train on other codes); sparse MHC: LazyAdam rows
    from mhe_plugins.bench import scale_ckpt, scale_train
    from mhe_plugins.bench.scale_train import run_spec

    tiny = dict(DEFAULTS, train_per_class=3.0, epochs=2.0, eval_examples=200, batch=64, hidden=16,
                embed_dim=8, threads=1, log_every=2)  # fmt: skip
    spec = plan(tiny, [400], [method], [], 1)[1]["spec"]
    learned = []
    real_learn = scale_train.learn_codes
    monkeypatch.setattr(scale_train, "learn_codes", lambda *a: learned.append(1) or real_learn(*a))
    spec.update(progress=False, checkpoint_every=1e-9)  # a checkpoint after every step
    ref = run_spec({**spec, "work_dir": str(tmp_path / "a"), "log_path": str(tmp_path / "a" / "log.jsonl")})
    assert ref["resumes"] == 0 and ref["steps"] == 36
    assert (ref["codes_s"] > 0) == (len(learned) == 1) == ("codes" in method)
    learned.clear()

    work = tmp_path / "b"
    saves = []
    real_save = scale_ckpt.Checkpointer.save

    def save_then_die(self, progress, modules, opts):
        real_save(self, progress, modules, opts)
        saves.append(progress.step)
        if progress.step == 23:  # mid second epoch
            raise _Killed

    monkeypatch.setattr(scale_ckpt.Checkpointer, "save", save_then_die)
    run = {**spec, "work_dir": str(work), "log_path": str(work / "log.jsonl")}
    with pytest.raises(_Killed):
        run_spec(run)
    assert len(learned) == ("codes" in method)
    learned.clear()
    monkeypatch.undo()
    monkeypatch.setattr(scale_train, "learn_codes", lambda *a: learned.append(1) or real_learn(*a))
    assert saves == list(range(1, 24)) and scale_ckpt.checkpoint_files(work)
    got = run_spec(run)
    assert got["resumes"] == 1 and got["steps"] == 36 and got["examples"] == ref["examples"]
    assert (
        got["final_loss"] == ref["final_loss"] and got["top1"] == ref["top1"] and got["top5"] == ref["top5"]
    )
    assert not learned and (got["codes_s"] > 0) == ("codes" in method)
    steps = [row["step"] for row in map(json.loads, (work / "log.jsonl").read_text().splitlines())]
    assert steps == list(range(2, 37, 2))  # logged once each, across the kill
