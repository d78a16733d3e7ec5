"""The screening summary is regenerated from the stored runs exactly as committed, and says what it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fairseq_ext.bench import screen

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_committed_screen_report_is_what_the_stored_runs_give(tmp_path):
    for run_dir in (RESULTS / "runs").glob("nmt_screen*"):
        shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name)
    result = screen.main(["--out-dir", str(tmp_path)])
    assert (tmp_path / "nmt_screen.md").read_text() == (RESULTS / "nmt_screen.md").read_text()
    assert json.loads((RESULTS / "nmt_screen.json").read_text()) == result
    assert "PARTIAL" not in (RESULTS / "nmt_screen.md").read_text()
    assert "not results" in (RESULTS / "nmt_screen.md").read_text()
    assert {r["vocab"] for r in result["rows"]} == {8000, 32000}


def test_a_changed_run_changes_the_row_and_no_runs_is_an_error(tmp_path):
    run = tmp_path / "runs" / "nmt_screen_x" / "v8000_mhc.json"
    run.parent.mkdir(parents=True)
    src = json.loads((RESULTS / "runs" / "nmt_screen8k_k500" / "v8000_mhc.json").read_text())
    src["result"]["valid_nll_bits"] = 9.876
    run.write_text(json.dumps(src))
    result = screen.main(["--out-dir", str(tmp_path)])
    assert [r["valid_nll_bits"] for r in result["rows"]] == [9.876]
    assert "| 9.876 |" in (tmp_path / "nmt_screen.md").read_text()
    with pytest.raises(FileNotFoundError, match="no screening runs"):
        screen.main(["--out-dir", str(tmp_path), "--name", "nothing_here"])
