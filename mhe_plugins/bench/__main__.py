"""``python -m mhe_plugins.bench heads --num-classes N --dim D --batch B [--heads H] [--json PATH]``;
``python -m mhe_plugins.bench scale [--num-classes N ...] [--methods M ...]`` (docs/scale.md)."""

from __future__ import annotations

import argparse

from .heads import format_table, run_heads_benchmark
from .report import write_markdown
from .worker import METHODS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mhe_plugins.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser(
        "heads", help="dense vs adaptive softmax vs MHP vs MHS: params, step time, top-k time, memory"
    )
    h.add_argument("--num-classes", type=int, required=True)
    h.add_argument("--dim", type=int, default=512)
    h.add_argument("--batch", type=int, default=256)
    h.add_argument("--heads", type=int, default=2)
    h.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    h.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    h.add_argument("--warmup", type=int, default=1)
    h.add_argument("--topk", type=int, default=5)
    h.add_argument("--timeout", type=float, default=1800.0, help="per method, seconds")
    h.add_argument(
        "--threads", type=int, default=0, help="torch threads in the measuring processes (0 = default)"
    )
    h.add_argument("--json", default=None, help="write all figures to this JSON file")
    h.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    _add_scale(sub)
    a = ap.parse_args(argv)
    if a.command == "scale":
        from .scale import run_benchmark

        res = run_benchmark(a)
        if res and not a.dry_run:
            print(f"report: {a.out_dir}/{a.report}.md" + (" (PARTIAL)" if res.get("partial") else ""))
        return
    for name, v in (
        ("--num-classes", a.num_classes),
        ("--dim", a.dim),
        ("--batch", a.batch),
        ("--heads", a.heads),
    ):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    if a.steps < 5:
        ap.error(f"--steps must be >= 5 (median of at least 5), got {a.steps}")
    res = run_heads_benchmark(
        a.num_classes,
        a.dim,
        a.batch,
        a.heads,
        tuple(a.methods),
        a.steps,
        a.warmup,
        a.topk,
        a.timeout,
        a.json,
        a.threads,
    )
    table = format_table(res)
    c = res["config"]
    print(
        f"\nN={c['num_classes']:,} D={c['dim']} B={c['batch']} H={c['heads']} (MHP heads {c['mhp_head_sizes']})"
    )
    print(table)
    if a.markdown:
        write_markdown(
            f"N={c['num_classes']:,}, D={c['dim']}, B={c['batch']}, H={c['heads']}\n\n{table}\n", a.markdown
        )


def _add_scale(sub) -> None:
    from .scale import DEFAULTS
    from .scale_train import METHODS

    p = sub.add_parser(
        "scale", help="train end to end at 10^5-10^7 classes: every head vs the oracle (docs/scale.md)"
    )
    p.add_argument("--num-classes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"of {METHODS}, each with optional overrides: mhs@head_optim=lazy_sgd,mhs_group=16",
    )
    p.add_argument("--sharded", type=int, nargs="*", default=[], help="N at which mhs/pfc also run sharded")
    p.add_argument("--nproc-per-node", type=int, default=2, help="ranks of the --sharded runs (torchrun)")
    p.add_argument("--equal-time", default=None, help="train the other methods for this method's time")
    p.add_argument(
        "--time-budget-at",
        nargs="*",
        default=[],
        metavar="N=SECONDS",
        help="every method at N trains at most SECONDS (so one run fits a session on a machine that keeps no "
        "checkpoint between sessions); a method's own smaller time_budget wins",
    )
    p.add_argument("--memory-limit", type=float, default=0.0, help="GiB per run (0: 80%% of MemAvailable)")
    p.add_argument("--out-dir", default="benchmarks/results", help="report + run store (runs/scale/)")
    p.add_argument("--work-dir", default="runs/scale", help="per-run specs and metric logs")
    p.add_argument(
        "--report",
        default="scale",
        help="report name: OUT_DIR/REPORT.{json,md,png}, of this command's runs (the store is shared)",
    )
    p.add_argument("--log-every", type=int, default=200, help="steps between logged metric rows")
    p.add_argument(
        "--checkpoint-every", type=float, default=1800.0, help="seconds between mid-run checkpoints (0: none)"
    )
    p.add_argument("--force", action="store_true", help="rerun cells that have a record")
    p.add_argument("--dry-run", action="store_true", help="list the runs and estimates; writes nothing")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the stored runs; trains nothing"
    )
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        what = f"a run setting (docs/scale.md), default {value}; per method: {key}=... after @"
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true", default=value, help=what)
        else:
            p.add_argument(flag, type=type(value), default=value, help=what)


if __name__ == "__main__":
    main()
