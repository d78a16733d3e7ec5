"""``--equal-time``: the reference runs first at each (N, world), every other method gets its wall time
(codes included) or its own smaller cap, and the run name carries that budget."""

from __future__ import annotations

from mhe_plugins.bench.scale import (
    DEFAULTS,
    equal_time_budget,
    plan,
    reference_first,
    run_key,
    run_name,
    timed_like_reference,
)
from mhe_plugins.bench.store import RunStore

METHODS = ["mhp", "mhc@time_budget=5", "mhs", "pfc"]


def _cells():
    return plan(dict(DEFAULTS), [1000, 2000], METHODS, [2000], 2)


def test_reference_runs_right_after_the_oracle_at_each_size_and_world():
    order = [
        (c["spec"]["num_classes"], c["spec"]["world"], c["label"]) for c in reference_first(_cells(), "mhs")
    ]
    assert order == [
        (1000, 1, "oracle"), (1000, 1, "mhs"), (1000, 1, "mhp"), (1000, 1, "mhc@time_budget=5"), (1000, 1, "pfc"),
        (2000, 1, "oracle"), (2000, 1, "mhs"), (2000, 1, "mhp"), (2000, 1, "mhc@time_budget=5"), (2000, 1, "pfc"),
        (2000, 2, "mhs"), (2000, 2, "pfc"),
    ]  # fmt: skip


def test_budget_is_the_reference_wall_with_codes_capped_by_the_own_budget():
    assert equal_time_budget({"train_s": 100.04, "codes_s": 20.0}, 0.0) == 120.0
    assert equal_time_budget({"train_s": 100.0}, 0.0) == 100.0
    assert equal_time_budget({"train_s": 100.0, "codes_s": 20.0}, 50.0) == 50.0
    assert equal_time_budget({"train_s": 100.0, "codes_s": 20.0}, 500.0) == 120.0


def test_waits_for_the_reference_then_takes_its_time_and_a_new_name(tmp_path):
    store = RunStore(tmp_path / "store")
    cells = reference_first(_cells(), "mhs")
    pfc = next(c for c in cells if c["label"] == "pfc" and c["spec"]["num_classes"] == 1000)
    mhc = next(c for c in cells if c["label"].startswith("mhc") and c["spec"]["num_classes"] == 1000)
    before = pfc["name"]
    assert not timed_like_reference(pfc, cells, store, "mhs")  # nothing stored yet: it waits
    assert pfc["name"] == before
    ref = next(c for c in cells if c["label"] == "mhs" and c["spec"]["num_classes"] == 1000)
    store.save(ref["name"], {"status": "ok", "train_s": 30.0, "codes_s": 2.5, "key": run_key(ref["spec"])})
    assert timed_like_reference(pfc, cells, store, "mhs") and timed_like_reference(mhc, cells, store, "mhs")
    assert pfc["spec"]["time_budget"] == 32.5 and mhc["spec"]["time_budget"] == 5.0
    assert pfc["name"] == run_name("pfc", pfc["spec"]) != before
    # the 2-rank pfc waits for the 2-rank mhs, not the one-process one
    pfc2 = next(c for c in cells if c["label"] == "pfc" and c["spec"]["world"] == 2)
    assert not timed_like_reference(pfc2, cells, store, "mhs")
    assert timed_like_reference(ref, cells, store, "mhs") and timed_like_reference(
        cells[0], cells, store, "mhs"
    )


def _sharded_rows(budget: bool, epochs_two: float) -> list[dict]:
    one = {
        "num_classes": 10**6,
        "world": 1,
        "status": "ok",
        "label": "pfc",
        "method": "pfc",
        "top1": 21.0,
        "head_param_bytes": 400,
        "head_state_bytes": 400,
        "epochs_done": 0.09,
        "budget_exhausted": budget,
    }
    two = dict(one, world=2, top1=26.0, epochs_done=epochs_two,
               per_rank=[{"head_param_bytes": 200, "head_state_bytes": 200}] * 2)  # fmt: skip
    return [one, two]


def test_sharded_check_does_not_compare_top1_of_time_budgeted_runs_that_trained_different_amounts():
    from mhe_plugins.bench.scale_report import checks

    ((crit, said),) = [c for c in checks(_sharded_rows(True, 0.14), [10**6]) if "ranks" in c[0]]
    assert "not comparable (0.14 vs 0.09 epochs" in said and "memory met: 0.500x" in said
    ((crit, said),) = [c for c in checks(_sharded_rows(False, 0.09), [10**6]) if "ranks" in c[0]]
    assert said.startswith("not met: 0.500x, top-1 26.00 vs 21.00")  # same work, 5 points apart: a real miss


def test_time_budget_at_caps_every_method_at_that_size_only_and_keeps_other_names():
    from mhe_plugins.bench.scale import parse_budgets

    budgets = parse_budgets(["2000=7", "1e7=4500"])
    assert budgets == {2000: 7.0, 10**7: 4500.0}
    plain, capped_cells = _cells(), plan(dict(DEFAULTS), [1000, 2000], METHODS, [2000], 2, budgets)
    for a, b in zip(plain, capped_cells):
        s, t = a["spec"], b["spec"]
        if t["method"] == "oracle" or t["num_classes"] == 1000:
            assert a["name"] == b["name"]  # untouched sizes keep their stored runs
            continue
        own = s["time_budget"]
        assert t["time_budget"] == (min(own, 7.0) if own else 7.0)
        assert a["name"] != b["name"] or own and own <= 7.0
    for bad in (["2000"], ["x=3"], ["2000=0"], ["2000=-1"]):
        try:
            parse_budgets(bad)
        except ValueError as err:
            assert bad[0] in str(err) and "N=SECONDS" in str(err)
        else:
            raise AssertionError(f"{bad} accepted")


def test_largest_size_check_says_when_the_best_head_was_stopped_by_its_time_budget():
    from mhe_plugins.bench.scale_report import checks

    def row(n, pct, exs, stopped):
        return {"num_classes": n, "world": 1, "status": "ok", "label": "mhs", "method": "mhs", "top1": pct,
                "pct_of_oracle": pct, "peak_rss_bytes": 2**30, "train_examples_per_s": exs,
                "budget_exhausted": stopped, "epochs_done": 1.2 if stopped else 2.0, "epochs_planned": 2.0}  # fmt: skip

    for stopped in (True, False):
        rows = [row(10**5, 75.0, 30000.0, False), row(10**7, 60.0, 20000.0, stopped)]
        said = checks(rows, [10**5, 10**7])[0][1]
        assert said.startswith("not met: best mhs at 60.0 % of oracle") and "1.50x slower" in said
        assert ("stopped by its time budget after 1.20 of 2 epochs" in said) is stopped
        assert "no boot id recorded for both" in said  # older records: not known to be one machine
    rows[0]["boot_id"] = rows[1]["boot_id"] = "b1"
    assert "(both timed on one machine boot)" in checks(rows, [10**5, 10**7])[0][1]
    rows[0]["boot_id"] = "b0"
    assert "different machines or boots" in checks(rows, [10**5, 10**7])[0][1]
