"""``python -m mhe_plugins.bench heads --num-classes N --dim D --batch B [--heads H] [--json PATH]``."""

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
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
