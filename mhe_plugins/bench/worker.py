"""Measurement processes of the head benchmark; each prints one JSON line.

``--measure memory --methods M``: one method alone in this process; peak RSS of two train steps above the
process's baseline (model, optimizer state and inputs exist and a warm-up step has run; freed memory is
returned to the OS first). Without permission to reset the kernel's peak counter (/proc/self/clear_refs)
the figure includes setup and is an upper bound.
``--measure times --methods M1 M2 ...``: median train-step and top-k times, interleaved round-robin.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time

import torch
from torch import nn

from mhe_plugins.heads import build_head

METHODS = ("dense", "adaptive", "mhp", "mhs")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Adaptive(nn.Module):
    """torch's AdaptiveLogSoftmaxWithLoss with cutoffs at 2 %, 10 %, 50 % of the classes (Zipf-style)."""

    def __init__(self, d: int, n: int):
        super().__init__()
        cutoffs = sorted({max(1, n // 50), max(2, n // 10), max(3, n // 2)})
        cutoffs = [c for c in cutoffs if c < n]
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(d, n, cutoffs=cutoffs, div_value=4.0)

    def compute_loss(self, x, t):
        return self.asm(x, t).loss

    @torch.no_grad()
    def topk(self, x, k):
        return self.asm.log_prob(x).topk(k, dim=1)  # it has only argmax predict(); top-k needs all N


def build(method: str, n: int, d: int, heads: int) -> nn.Module:
    if method == "dense":
        return build_head("linear", d, n)
    if method == "adaptive":
        return Adaptive(d, n)
    if method == "mhp":
        return build_head("mhp", d, n, num_heads=heads)
    if method == "mhs":
        return build_head("mhs", d, n, mode="batch_union", sparse_grad=True)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _inputs(n: int, d: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, generator=g), torch.randint(0, n, (batch,), generator=g)


def _stepper(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.compute_loss(x, target).backward()
        opt.step()
        dt = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        return dt

    return step


def _topk_timer(model: nn.Module, x: torch.Tensor, k: int):
    def run() -> float:
        t0 = time.perf_counter()
        model.topk(x, k)
        return time.perf_counter() - t0

    return run


def measure_memory(method: str, n: int, d: int, batch: int, heads: int, warmup: int, seed: int) -> dict:
    """Peak RSS of train steps above the baseline (model + optimizer + inputs + one warm-up step done)."""
    torch.manual_seed(seed)
    x, target = _inputs(n, d, batch, seed)
    model = build(method, n, d, heads)
    step = _stepper(model, x, target)
    for _ in range(max(1, warmup)):
        step()
    gc.collect()
    _malloc_trim()  # give freed warm-up memory back so the steps' working set is counted, not hidden
    can_reset = reset_peak_rss()
    base_kb = _status_kb("VmRSS")
    for _ in range(2):
        step()
    peak_kb = _status_kb("VmHWM")
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "peak_mem_bytes": int(max(0, peak_kb - base_kb) * 1024),
        "baseline_rss_bytes": int(base_kb * 1024),
        "peak_counter_reset": can_reset,
    }


def measure_times(
    methods: list[str], n: int, d: int, batch: int, heads: int, steps: int, warmup: int, k: int, seed: int
) -> dict:
    """Median train-step and top-k times, methods interleaved round-robin in one process so that any
    background load on the machine hits every method alike (the ratios stay fair)."""
    torch.manual_seed(seed)
    x, target = _inputs(n, d, batch, seed)
    models = {m: build(m, n, d, heads) for m in methods}
    steppers = {m: _stepper(models[m], x, target) for m in methods}
    topkers = {m: _topk_timer(models[m].eval(), x, k) for m in methods}
    for m in methods:
        for _ in range(max(1, warmup)):
            steppers[m]()
            topkers[m]()
    st = {m: [] for m in methods}
    tk = {m: [] for m in methods}
    for _ in range(steps):
        for m in methods:
            st[m].append(steppers[m]())
        for m in methods:
            tk[m].append(topkers[m]())
    return {
        m: {
            "train_step_s": statistics.median(st[m]),
            "topk_s": statistics.median(tk[m]),
            "step_times_s": st[m],
            "topk_times_s": tk[m],
        }
        for m in methods
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--measure", choices=("memory", "times"), required=True)
    ap.add_argument("--methods", nargs="+", required=True, choices=METHODS)
    ap.add_argument("--num-classes", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.measure == "memory":
        if len(a.methods) != 1:
            ap.error("--measure memory takes exactly one method (one process per method)")
        res = measure_memory(a.methods[0], a.num_classes, a.dim, a.batch, a.heads, a.warmup, a.seed)
    else:
        res = measure_times(
            a.methods, a.num_classes, a.dim, a.batch, a.heads, a.steps, a.warmup, a.topk, a.seed
        )
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
