import json
import subprocess
import sys

from mhe_plugins.bench import heads as bench


def test_heads_benchmark_writes_schema_and_counts_params(tmp_path):
    out = tmp_path / "heads.json"
    res = bench.run_heads_benchmark(3000, 16, 8, heads=2, steps=5, warmup=1, json_path=out, threads=1)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(res))
    m = on_disk["methods"]
    assert set(m) == {"dense", "adaptive", "mhp", "mhs"}
    for r in m.values():
        assert {"params", "train_step_s", "topk_s", "peak_mem_bytes"} <= set(r), r
        assert r["train_step_s"] > 0 and r["topk_s"] > 0 and r["peak_mem_bytes"] >= 0
    sizes = on_disk["config"]["mhp_head_sizes"]
    assert m["dense"]["params"] == 16 * 3000 + 3000
    assert m["mhp"]["params"] == 17 * sum(sizes)  # one Linear(d, sum C_h) with bias
    assert m["mhs"]["params"] == 16 * sizes[0] * sizes[1]
    table = bench.format_table(res)
    assert "| mhp |" in table and "faster" in table


def test_method_that_cannot_fit_records_error(monkeypatch):
    monkeypatch.setattr(bench, "mem_available_bytes", lambda: 200 * 2**10)  # pretend 200 KiB free
    res = bench.run_heads_benchmark(3000, 16, 8, methods=("dense", "mhp"), steps=5, threads=1)
    assert "error" in res["methods"]["dense"] and "GiB" in res["methods"]["dense"]["error"]
    assert "train_step_s" in res["methods"]["mhp"]


def test_cli_rejects_bad_sizes():
    proc = subprocess.run(
        [sys.executable, "-m", "mhe_plugins.bench", "heads", "--num-classes", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--num-classes must be >= 1, got 0" in proc.stderr
