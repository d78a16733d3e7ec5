"""``make crash-test``: kill each trainer before every one of its file events, resume, check the invariants,
print a summary and write it as JSON.

    python tests/crash/run.py                                   # all kill points, all four trainers
    python tests/crash/run.py --trainers timm --points 17 45    # chosen points (reproduce a failure)
    python tests/crash/run.py --sample 3 --seed 20260101        # the CI subset of that day
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `crash` is importable as a package

from crash.checks import trace_notes  # noqa: E402
from crash.harness import (  # noqa: E402
    INVARIANTS,
    TrainerReport,
    default_seed,
    double_kills,
    reference_run,
    run_scenario,
    sample_points,
)
from crash.trainers import TRAINERS, available, make  # noqa: E402


def scenarios(name: str, count: int, args: argparse.Namespace) -> list[tuple[tuple[int, ...], str]]:
    """(kill points, mode) to try: every point (or the given / sampled ones), a few double kills and,
    with ``--interrupt``, Ctrl-C at every ``--interrupt``-th point."""
    if args.points:
        points = [p for p in args.points if 1 <= p <= count]
    elif args.sample:
        points = sample_points(name, count, args.sample, args.seed)
    else:
        points = list(range(1, count + 1))
    todo = [((n,), "kill") for n in points]
    if args.doubles:
        todo += [(pair, "kill") for pair in double_kills(points, args.doubles)]
    if args.interrupt:
        todo += [((n,), "interrupt") for n in points[:: args.interrupt]]
    return todo


def run_trainer(name: str, args: argparse.Namespace, work: Path) -> TrainerReport:
    t0 = time.monotonic()
    trainer = make(name)
    ref = reference_run(trainer, work / name)
    report = TrainerReport(name, ref.count, reference_s=round(ref.seconds, 1))
    report.events = [f"{e.n} {e}" for e in ref.events]
    report.durability_notes = trace_notes(ref.events)
    todo = scenarios(name, ref.count, args)
    print(
        f"[{name}] {ref.count} kill points, reference run {ref.seconds:.1f}s; {len(todo)} scenarios",
        flush=True,
    )
    for i, (kills, mode) in enumerate(todo, 1):
        res = run_scenario(trainer, ref, work / name, kills, mode, keep=args.keep)
        report.add(res, (*INVARIANTS, *trainer.extra_invariants))
        status = "ok" if not res.failures else f"FAILED {sorted({f.invariant for f in res.failures})}"
        where = " | ".join(res.events)
        print(f"[{name}] {i}/{len(todo)} {mode} N={'+'.join(map(str, kills))} ({where}) {res.seconds:.0f}s {status}",
              flush=True)  # fmt: skip
        for line in res.lines():
            print("    " + line[:600], flush=True)
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    p.add_argument("--points", type=int, nargs="+", help="only these kill points")
    p.add_argument("--sample", type=int, default=0, help="K kill points per trainer chosen from --seed")
    p.add_argument("--seed", type=int, default=default_seed())
    p.add_argument("--doubles", type=int, default=6, help="a double kill at every K-th point (0: none)")
    p.add_argument("--interrupt", type=int, default=5, help="also Ctrl-C at every K-th point (0: none)")
    p.add_argument("--json", default="runs/crash_test.json", help="summary written here")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep every scenario folder (failing ones are kept)")
    p.add_argument("--md", default=None, help="also write the summary as a markdown table here")
    p.add_argument(
        "--report", nargs="+", default=None, metavar="JSON",
        help="run nothing: merge these summaries into --json (and --md)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.report:
        merged: dict[str, dict] = {}
        for path in args.report:
            merged.update(json.loads(Path(path).read_text())["trainers"])
        _write(merged, args, work="(merged)")
        return 1 if any(r.get("failed") for r in merged.values()) else 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mhe-crash-"))
    print(f"scratch folder {work}; seed {args.seed}", flush=True)
    reports: dict[str, dict] = {}
    for name in args.trainers:
        if why := available(name):
            print(f"[{name}] skipped: {why}", flush=True)
            reports[name] = {"trainer": name, "skipped": why}
            continue
        reports[name] = run_trainer(name, args, work).to_json()
    print("\nsummary")
    for name, r in reports.items():
        if "skipped" in r:
            print(f"  {name}: skipped ({r['skipped']})")
            continue
        failed = ", ".join(f"{k} x{v}" for k, v in sorted(r["failed"].items())) or "none"
        print(f"  {name}: {r['kill_points']} kill points, {r['scenarios']} scenarios, {r['seconds']:.0f}s; "
              f"invariants failed: {failed}")  # fmt: skip
        for note in r["durability_notes"][:5]:
            print(f"    durability (power loss, not a kill): {note}")
        if len(r["durability_notes"]) > 5:
            print(f"    ... {len(r['durability_notes']) - 5} more durability notes in the JSON")
    _write(reports, args, str(work))
    return 1 if any(r.get("failed") for r in reports.values()) else 0


def _write(reports: dict[str, dict], args: argparse.Namespace, work: str) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "trainers": reports}, indent=1) + "\n")  # no machine path
    print(f"written {out}")
    if args.md:
        Path(args.md).write_text(markdown(reports))
        print(f"written {args.md}")


def markdown(reports: dict[str, dict]) -> str:
    """The summary as a table: kill points, scenarios (single kills, double kills, Ctrl-C), invariant checks
    held and failed, wall seconds."""
    rows = [
        "# Crash injection: every file event of each trainer (`make crash-test`)",
        "",
        "| trainer | kill points | scenarios | invariant checks held | failed | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in reports.items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        held, failed = sum(r["held"].values()), sum(r["failed"].values())
        rows.append(
            f"| {name} | {r['kill_points']} | {r['scenarios']} | {held} | {failed} | {r['seconds']:.0f} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
