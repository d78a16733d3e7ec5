"""The scale benchmark's report, ``OUT/scale.{json,md,png}``, written from the run store alone.

One row per planned cell (N, method, ranks), with the oracle of its N beside it; cells without a finished
record make the report PARTIAL (and are named). The checks of issue 29 are evaluated from the rows that
exist and say "not measured" otherwise; nothing is estimated here.
"""

from __future__ import annotations

from pathlib import Path

from .report import mark_partial, partial_banner, pyplot, save_figure, write_reports
from .store import RunStore

__all__ = ["collect", "write_scale_report", "markdown", "plot", "checks"]

GIB = 2**30
MHE = ("mhp", "mhc", "mhs")
FIELDS = (
    "status", "top1", "top5", "train_examples_per_s", "train_examples_per_s_wall", "train_cpu_s", "epoch_s",
    "epoch_s_measured", "epochs_done", "budget_exhausted", "train_s", "topk_queries_per_s", "topk_exact",
    "peak_rss_bytes", "head_param_bytes", "head_state_bytes", "head_params", "head_sizes", "per_rank",
    "wall_s", "estimated_bytes", "memory_limit_bytes", "error", "eval_examples", "resumes", "codes_s",
)  # fmt: skip


def collect(cells: list[dict], store: RunStore) -> tuple[list[dict], list[str]]:
    """(rows, names of the cells without a finished record)."""
    from .scale import oracle_key, run_key

    rows, missing = [], []
    oracle = {}
    for c in cells:
        spec = c["spec"]
        rec = store.find(c["name"], run_key(spec))
        if rec is None or rec.get("status") not in ("ok", "oom"):
            missing.append(c["name"])
            continue
        row = {"label": c["label"], "method": spec["method"], "num_classes": spec["num_classes"]}
        row.update(world=spec["world"], name=c["name"], time_budget=spec.get("time_budget") or 0.0)
        row["epochs_planned"] = spec.get("epochs")
        row["boot_id"] = (rec.get("environment") or {}).get("boot_id") or ""  # which machine state timed it
        row.update({k: rec.get(k) for k in FIELDS if k in rec})
        row["oracle_key"] = oracle_key(spec)
        if spec["method"] == "oracle" and rec.get("status") == "ok":
            oracle[row["oracle_key"]] = rec
        rows.append(row)
    for r in rows:
        o = oracle.get(r.pop("oracle_key"))  # the oracle of the row's own held-out task
        if o is not None and r["method"] != "oracle":
            r["oracle_top1"] = o["top1"]
            if r.get("top1") is not None:
                r["pct_of_oracle"] = 100.0 * r["top1"] / o["top1"]
    return rows, missing


def _boot_note(a: dict, b: dict) -> str:
    """Whether two rows' timings compare: one boot of one machine, or not (our machines change between
    sessions, so a ratio across boots mixes machines)."""
    if not (a.get("boot_id") and b.get("boot_id")):
        return " (no boot id recorded for both: perhaps timed on different machines)"
    if a["boot_id"] == b["boot_id"]:
        return " (both timed on one machine boot)"
    return " (timed on different machines or boots: the ratio mixes machines)"


def _wall(row: dict) -> float:
    """Seconds a user waits for a trained head: training plus learning the label codes (0 for id codes)."""
    return float(row.get("train_s") or 0) + float(row.get("codes_s") or 0)


def _get(rows, n, label=None, method=None, world=1):
    return [
        r
        for r in rows
        if r["num_classes"] == n
        and r["world"] == world
        and r.get("status") == "ok"
        and (label is None or r["label"] == label)
        and (method is None or r["method"] == method)
    ]


def checks(rows: list[dict], sizes: list[int]) -> list[tuple[str, str]]:
    """(criterion of issue 29, what the stored rows say) pairs."""
    out = []
    big, small = max(sizes), min(sizes)
    mhe = [r for m in MHE for r in _get(rows, big, method=m)]
    if mhe:
        best = max(mhe, key=lambda r: r.get("pct_of_oracle") or 0)
        base = _get(rows, small, label=best["label"])
        ratio = base[0]["train_examples_per_s"] / best["train_examples_per_s"] if base else None
        ok = (
            (best.get("pct_of_oracle") or 0) >= 90
            and best["peak_rss_bytes"] <= 24 * GIB
            and ratio
            and ratio <= 2
        )
        out.append((
            f"N={big:,}: an MHE head trains in <= 24 GiB, >= 90 % of oracle top-1, ex/s within 2x of N={small:,}",
            f"{'met' if ok else 'not met'}: best {best['label']} at {best.get('pct_of_oracle', 0):.1f} % of oracle, "
            f"peak RSS {best['peak_rss_bytes'] / GIB:.1f} GiB, "
            + (f"ex/s {ratio:.2f}x slower than at N={small:,}" if ratio else f"no N={small:,} run")
            + (_boot_note(base[0], best) if ratio else "")
            + (f" (stopped by its time budget after {best.get('epochs_done') or 0:.2f} of "
               f"{best.get('epochs_planned') or 0:g} epochs)" if best.get("budget_exhausted") else ""),
        ))  # fmt: skip
    else:
        out.append((f"N={big:,}: an MHE head trains end to end", "not measured"))
    mid = 10**6
    dense, pfc = _get(rows, mid, method="linear"), _get(rows, mid, method="pfc")
    mhe = [r for m in MHE for r in _get(rows, mid, method=m)]
    if dense and mhe:
        best, d = max(mhe, key=lambda r: r["top1"]), dense[0]
        speed = best["train_examples_per_s"] / d["train_examples_per_s"]
        ok = best["top1"] >= d["top1"] - 2 and speed >= 10
        out.append((
            "N=1,000,000: best MHE head within 2 points of dense top-1 and >= 10x faster per example",
            f"{'met' if ok else 'not met'}: {best['label']} {best['top1']:.2f} vs dense {d['top1']:.2f}, {speed:,.1f}x faster"
            + (f" (dense stopped by its time budget after {d.get('epochs_done') or 0:.2f} of {d.get('epochs_planned') or 0:g} "
               "epochs: compared at equal wall time, not at the dense layer's full budget)"
               if d.get("budget_exhausted") else ""),
        ))  # fmt: skip
    else:
        out.append(("N=1,000,000: best MHE head vs dense", "not measured"))
    if pfc and mhe:
        # equal wall time: the MHE head may not have trained longer than the sampled softmax
        best = max(mhe, key=lambda r: r["top1"])
        p = max(pfc, key=_wall)
        fair = _wall(best) <= 1.05 * _wall(p)
        ok = fair and best["top1"] >= p["top1"]
        out.append((
            "N=1,000,000: MHE top-1 >= sampled softmax (Partial FC) top-1 at equal wall time",
            f"{'met' if ok else 'not met'}: {best['label']} {best['top1']:.2f} in {_wall(best):,.0f} s "
            f"of training (learning its codes included) vs {p['label']} {p['top1']:.2f} in {_wall(p):,.0f} s"
            + ("" if fair else " (the MHE head trained longer: rerun pfc with --equal-time or a time_budget)"),
        ))  # fmt: skip
    mhp = _get(rows, big, method="mhp")
    if mhp:
        q = mhp[0]["topk_queries_per_s"]
        out.append(
            (
                f"N={big:,}: exact MHP top-5 >= 1,000 queries/s",
                f"{'met' if q >= 1000 else 'not met'}: {q:,.0f}/s",
            )
        )
    for r in rows:
        if r["world"] > 1 and r.get("status") == "ok":
            one = _get(rows, r["num_classes"], label=r["label"])
            if not one or not r.get("per_rank"):
                continue
            per = max((p["head_param_bytes"] or 0) + (p["head_state_bytes"] or 0) for p in r["per_rank"])
            ref = one[0]["head_param_bytes"] + one[0]["head_state_bytes"]
            dt = r["top1"] - one[0]["top1"]
            ok = per / ref <= 0.55 and abs(dt) <= 0.5
            verdict = "met" if ok else "not met"
            ep, ep1 = r.get("epochs_done") or 0, one[0].get("epochs_done") or 0
            if (r.get("budget_exhausted") or one[0].get("budget_exhausted")) and abs(ep - ep1) > 0.005:
                # time-budgeted runs that trained different amounts: their top-1 says nothing about sharding
                verdict = f"top-1 not comparable ({ep:.2f} vs {ep1:.2f} epochs in their time budgets); memory"
                verdict += " met" if per / ref <= 0.55 else " not met"
            out.append((
                f"N={r['num_classes']:,}, {r['label']} over {r['world']} ranks: head memory/rank <= 0.55x, top-1 +-0.5",
                f"{verdict}: {per / ref:.3f}x, top-1 {r['top1']:.2f} vs {one[0]['top1']:.2f}",
            ))  # fmt: skip
    return out


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(result: dict) -> str:
    m = result["meta"]
    s = m["settings"]
    lines = ["# Scale benchmark: 10^5 -> 10^7 classes end to end", ""]
    lines += partial_banner(result["partial"], result["missing"])
    lines += [
        f"Data (`mhe_plugins/bench/scale_data.py`, seed {s['seed']}): D={s['dim']} features, Zipf exponent "
        f"{s['zipf']}, 3-level tree ({s['leaf_group']} leaves/mid, {s['mid_group']} mids/top; weights "
        f"{s['w_top']}/{s['w_mid']}/{s['w_leaf']}), noise {s['noise']}, label noise {s['label_noise']} (train), "
        f"{s['train_per_class']} training examples per class on average, {s['eval_examples']:,} held-out. "
        f"Model: MLP {s['dim']}-{s['hidden']}-{s['embed_dim']} + head; {s['epochs']} epochs, batch {s['batch']}, "
        f"encoder Adam lr {s['lr']}. Machine: {m['environment']['machine']}, memory limit per run "
        f"{m['environment']['memory_limit_bytes'] / GIB:.1f} GiB.",
        "",
        "train ex/s: examples per second of the training step (forward, backward, optimizer; data generation "
        "excluded, it is in time/epoch). top-5 q/s: exact top-5 queries per second (encoder + head; MHC's is "
        "its beam search). head/rank: head parameters + optimizer state on one rank.",
        "",
    ]
    for n in result["sizes"]:
        rows = [r for r in result["rows"] if r["num_classes"] == n]
        lines += [f"## N = {n:,}", ""]
        lines += [
            "| method | ranks | status | top-1 | top-5 | % of oracle | train ex/s | time/epoch (s) | epochs | "
            "top-5 q/s | peak RSS (GiB) | head/rank (GiB) | wall (s) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            head = None
            if r.get("head_param_bytes") is not None:
                per = r.get("per_rank") or [r]
                head = (
                    max((p.get("head_param_bytes") or 0) + (p.get("head_state_bytes") or 0) for p in per)
                    / GIB
                )
            status = r["status"] + (" (time budget)" if r.get("budget_exhausted") else "")
            lines.append(
                f"| {r['label']} | {r['world']} | {status} | {_fmt(r.get('top1'), '.2f')} | {_fmt(r.get('top5'), '.2f')} | "
                f"{_fmt(r.get('pct_of_oracle'), '.1f')} | {_fmt(r.get('train_examples_per_s'), ',.0f')} | "
                f"{_fmt(r.get('epoch_s'), ',.0f')} | {_fmt(r.get('epochs_done'), '.2f')} | "
                f"{_fmt(r.get('topk_queries_per_s'), ',.0f')} | {_fmt((r.get('peak_rss_bytes') or 0) / GIB, '.2f')} | "
                f"{_fmt(head, '.3f')} | {_fmt(r.get('wall_s'), ',.0f')} |"
            )
        errs = [r for r in rows if r.get("error")]
        if errs:
            lines.append("")
            lines += [
                f"- {r['label']} ({r['world']} ranks): {r['status']}: `{r['error'][:300]}`" for r in errs
            ]
        lines.append("")
    lines += ["## Checks (issue 29)", ""]
    lines += [f"- {what}: {said}" for what, said in result["checks"]]
    lines += [
        "",
        "Runs: `" + "`, `".join(r["name"] for r in result["rows"]) + "` in `runs/scale/`."
        if result["rows"]
        else "",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ok = [r for r in result["rows"] if r.get("status") == "ok" and r["world"] == 1]
    for label in dict.fromkeys(r["label"] for r in ok):
        rs = sorted((r for r in ok if r["label"] == label), key=lambda r: r["num_classes"])
        ns = [r["num_classes"] for r in rs]
        oracle = rs[0]["method"] == "oracle"
        style = dict(color="black", linestyle="--" if label == "oracle" else ":") if oracle else {}
        axes[0].plot(ns, [r["top1"] for r in rs], marker="o", label=label, **style)
        if not oracle:
            axes[1].plot(ns, [r["epoch_s"] for r in rs], marker="o", label=label)
            axes[2].plot(ns, [r["train_examples_per_s"] for r in rs], marker="o", label=label)
    titles = ("held-out top-1 (%)", "time per epoch (s)", "training examples/s")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("classes N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("scale benchmark" + (" (PARTIAL)" if result["partial"] else ""))
    fig.tight_layout()
    save_figure(fig, path)


def write_scale_report(prefix, cells: list[dict], store: RunStore, meta: dict) -> dict:
    rows, missing = collect(cells, store)
    sizes = sorted({c["spec"]["num_classes"] for c in cells})
    result = mark_partial(
        {"missing": missing, "sizes": sizes, "meta": meta, "checks": checks(rows, sizes), "rows": rows},
        bool(missing),
    )
    write_reports(prefix, result, markdown(result), plot if rows else None)
    return result
