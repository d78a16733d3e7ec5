"""``make demo`` / ``mhe-demo``: the project's first impression in a few minutes on a CPU.

1. The heads alone at 10^6 classes: dense ``Linear + CE`` vs an MHP head (parameters, train-step time,
   exact top-5 time, peak step memory), measured now by :mod:`mhe_plugins.bench` (a short run).
2. One toolkit result with its dense baseline: the XMC trainer's MHC head vs a flat classifier on the bundled
   WordNet-XMC (13,723 labels), TF-IDF encoder, test split; run as ``python -m xmc.demo`` in a subprocess
   (the core imports no adapter).
3. A figure of both (``demo.png``).

Everything goes under ``./runs/demo/`` of the current directory (``--output``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .entry import require_extra

PROG = "python -m mhe_plugins.demo"


def heads_headline(num_classes: int, dim: int, batch: int, steps: int, out: Path) -> dict:
    """Dense vs MHP at ``num_classes``; writes ``heads.json`` and returns the benchmark's result dict."""
    from .bench.heads import run_heads_benchmark

    return run_heads_benchmark(
        num_classes, dim, batch, 2, ("dense", "mhp"), steps=steps, warmup=1, k=5, timeout=600.0,
        json_path=out / "heads.json",
    )  # fmt: skip


def describe_heads(res: dict) -> str:
    """One paragraph: MHP vs dense, or why dense could not run."""
    c, m = res["config"], res["methods"]
    d, p = m["dense"], m["mhp"]
    head = f"N = {c['num_classes']:,} classes, d = {c['dim']}, batch {c['batch']}, MHP heads {c['mhp_head_sizes']}"
    if "error" in p:
        return f"{head}: MHP failed: {p['error']}"
    mhp = (
        f"MHP: {p['params']:,} parameters, train step {p['train_step_s'] * 1e3:.1f} ms, exact top-5 "
        f"{p['topk_s'] * 1e3:.1f} ms, peak step memory {p['peak_mem_bytes'] / 2**20:,.1f} MiB"
    )
    if "error" in d:
        return f"{head}\n  {mhp}\n  dense: {d['error']}"
    return (
        f"{head}\n  dense: {d['params']:,} parameters, train step {d['train_step_s'] * 1e3:,.0f} ms, exact top-5 "
        f"{d['topk_s'] * 1e3:,.0f} ms, peak step memory {d['peak_mem_bytes'] / 2**20:,.1f} MiB\n  {mhp}\n"
        f"  => MHP: {d['params'] / p['params']:,.0f}x fewer parameters, "
        f"{d['train_step_s'] / p['train_step_s']:,.0f}x faster train step, "
        f"{d['topk_s'] / p['topk_s']:,.0f}x faster top-5, "
        f"{d['peak_mem_bytes'] / max(p['peak_mem_bytes'], 1):,.0f}x less step memory"
    )


def run_xmc(out: Path, steps: int, threads: int) -> dict:
    """``python -m xmc.demo`` into ``out`` (``steps`` optimizer steps per head, batch 256, within one epoch);
    returns its ``comparison.json`` (per head: test metrics, classifier parameters, seconds)."""
    cmd = [sys.executable, "-m", "xmc.demo", "--output", str(out), "--epochs", "1", "--max-steps", str(steps),
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"{PROG}: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return json.loads((out / "comparison.json").read_text())


def plot(heads: dict | None, xmc: dict | None, path: Path) -> None:
    """One panel per part that ran: dense / MHP ratios (log scale), and XMC P@k of MHC vs flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = (heads or {}).get("methods", {})
    show_heads = "params" in m.get("dense", {}) and "params" in m.get("mhp", {})
    panels = int(show_heads) + int(bool(xmc))
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4), squeeze=False)
    axes = list(axes[0])
    if show_heads:
        ax = axes.pop(0)
        d, p = m["dense"], m["mhp"]
        keys = [("params", "parameters"), ("train_step_s", "train step"), ("topk_s", "exact top-5"),
                ("peak_mem_bytes", "step memory")]  # fmt: skip
        ratios = [d[k] / max(p[k], 1e-12) for k, _ in keys]
        bars = ax.bar([lab for _, lab in keys], ratios, color="tab:green", bottom=0)
        ax.bar_label(bars, labels=[f"{r:,.0f}x" for r in ratios])
        ax.set_yscale("log")
        ax.set_ylim(1, max(ratios) * 3)
        ax.set_ylabel("dense head / MHP head (higher = MHP cheaper)")
        c = heads["config"]
        ax.set_title(f"{c['num_classes']:,} classes, d={c['dim']}, batch {c['batch']}", fontsize=10)
    if xmc:
        ax = axes.pop(0)
        cols = ["P@1", "P@3", "P@5", "nDCG@5", "PSP@5"]
        width = 0.38
        for i, (name, color) in enumerate((("mhc", "tab:blue"), ("flat", "tab:gray"))):
            if name in xmc:
                xs = [j + (i - 0.5) * width for j in range(len(cols))]
                label = f"{name} ({xmc[name]['classifier_params']:,} classifier params)"
                ax.bar(xs, [xmc[name][c] for c in cols], width, label=label, color=color)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylabel("percent (test split)")
        ax.set_title("WordNet-XMC, 13,723 labels: MHC vs flat head (demo budget)", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="runs/demo", help="relative to the current directory")
    ap.add_argument("--num-classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (median)")
    ap.add_argument(
        "--xmc-steps", type=int, default=60, help="optimizer steps per XMC head (298 = one epoch)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the XMC run")
    ap.add_argument("--skip-heads", action="store_true")
    ap.add_argument("--skip-xmc", action="store_true")
    a = ap.parse_args(argv)
    for name, v in (("--num-classes", a.num_classes), ("--steps", a.steps), ("--xmc-steps", a.xmc_steps)):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    if not a.skip_xmc:
        require_extra(PROG, "xmc")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    heads = xmc = None
    if not a.skip_heads:
        print(
            f"== 1/2 heads alone: dense vs MHP at {a.num_classes:,} classes (short run, {a.steps} timed steps)"
        )
        t1 = time.time()
        heads = heads_headline(a.num_classes, a.dim, a.batch, a.steps, out)
        print(describe_heads(heads))
        print(f"  (part 1 took {time.time() - t1:.0f} s)", flush=True)
    if not a.skip_xmc:
        print(
            f"\n== 2/2 XMC trainer: MHC vs flat head on the bundled WordNet-XMC ({a.xmc_steps} steps of 256 docs)"
        )
        t2 = time.time()
        xmc = run_xmc(out / "xmc", a.xmc_steps, a.threads)
        mhc, flat = xmc["mhc"], xmc["flat"]
        print(
            f"  => MHC P@1 {mhc['P@1']:.2f} / P@5 {mhc['P@5']:.2f} vs flat {flat['P@1']:.2f} / {flat['P@5']:.2f}, with "
            f"{flat['classifier_params'] / mhc['classifier_params']:.1f}x fewer classifier parameters "
            f"(after {a.xmc_steps} steps each: a demo budget; full runs in README 'Measured results')"
        )
        print(f"  (part 2 took {time.time() - t2:.0f} s)", flush=True)
    plot(heads, xmc, out / "demo.png")
    print(f"\nDone in {time.time() - t0:.0f} s. Outputs in {out.resolve()}:")
    if heads:
        print("  heads.json        the heads benchmark (every figure, config, load average at start)")
    if xmc:
        print("  xmc/comparison.json, xmc/mhc/, xmc/flat/   the XMC models, logs and metrics")
    print("  demo.png          the plot of both")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
