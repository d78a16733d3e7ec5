"""Kill each trainer (SIGKILL) right before one of its file events, resume it the documented way, and check
that recovery ends where an uninterrupted run ends (see harness.py for the invariants).

`make test` runs a few kill points per trainer, chosen from today's date (reproduce a day with
MHE_CRASH_SEED=YYYYMMDD; more points with MHE_CRASH_SAMPLE=K). Every kill point: MHE_CRASH_FULL=1, or
`make crash-test` (summary + JSON).
"""

from __future__ import annotations

import os

import pytest

from crash.harness import (
    default_seed,
    double_kills,
    reference_run,
    run_scenario,
    sample_points,
)
from crash.trainers import TRAINERS, available, make

FULL = os.environ.get("MHE_CRASH_FULL") == "1"
SAMPLE = int(os.environ.get("MHE_CRASH_SAMPLE", "2"))

#: trainers whose recovery is known to break some invariant at some kill point (found by the full run;
#: see the reasons). strict=False: the day's sample may miss the failing points. Remove a mark once
#: `make crash-test` shows the trainer clean.
KNOWN_FAILING: dict[str, str] = {
    "fairseq": "a kill after the final checkpoint_last.pt commit, before fairseq prunes the oldest "
    "checkpoint_<epoch>_<updates>.pt (--keep-interval-updates): the resume at max-update trains nothing, "
    "so that file stays for good (no_stray_files at the last 2 of 34 kill points)",
}


def _params() -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=False, reason=KNOWN_FAILING[n]))
        if n in KNOWN_FAILING
        else n
        for n in TRAINERS
    ]


def _crash_test(name: str, work, full: bool) -> None:
    if why := available(name):
        pytest.skip(why)
    trainer = make(name)
    ref = reference_run(trainer, work / name)
    seed = default_seed()
    points = list(range(1, ref.count + 1)) if full else sample_points(name, ref.count, SAMPLE, seed)
    scenarios = [(n,) for n in points] + (double_kills(points) if full else [])
    failures = []
    for kills in scenarios:
        failures += run_scenario(trainer, ref, work / name, kills).lines()
    if failures:
        again = " ".join(str(k[0]) for k in scenarios)
        pytest.fail(
            f"{len(failures)} invariant(s) broken ({ref.count} kill points, tried {scenarios}, seed {seed}; "
            f"rerun: python tests/crash/run.py --trainers {name} --points {again}):\n" + "\n".join(failures),
            pytrace=False,
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", _params())
def test_sampled_kill_points_recover_exactly(name, tmp_path):
    _crash_test(name, tmp_path, full=False)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="every kill point: MHE_CRASH_FULL=1 or `make crash-test`")
@pytest.mark.parametrize("name", _params())
def test_every_kill_point_recovers_exactly(name, tmp_path):
    _crash_test(name, tmp_path, full=True)
