"""The NMT benchmark's report: convergence check, the issue's targets, and the .json / .md / .png files."""

from __future__ import annotations

from pathlib import Path

from fairseq_ext.model import SHORTLIST_DIVISOR
from mhe_plugins.bench.report import partial_banner, pyplot, save_figure, write_reports

from .methods import METHODS, NAMES
from .runs import LOG_INTERVAL

CONVERGED_BITS = 0.05  # CE's valid nll may move less than this over the last fifth of training


def convergence(curve: list[dict], final: int) -> dict:
    """Valid nll change over the last fifth of training: from the first point at >= 80 % of ``final``."""
    pts = [p for p in curve if p["updates"] <= final]
    start = next((p for p in pts if p["updates"] >= 0.8 * final), None)
    if not pts or start is None or start is pts[-1]:
        return {"from_update": None, "to_update": final, "delta_bits": None, "converged": False}
    delta = pts[-1]["nll_loss"] - start["nll_loss"]
    return {
        "from_update": start["updates"],
        "to_update": pts[-1]["updates"],
        "delta_bits": round(delta, 4),
        "converged": abs(delta) < CONVERGED_BITS,
    }


DENSE, ADAPTIVE = ("ce", "ce0"), ("adaptive", "adaptive_ls")
# stored variants of a method, shown under it (their speeds are whole-run figures, in brackets)
VARIANTS = {"repeats": "seed 2", "tied": "tied embeddings (--share-decoder-input-output-embed)"}


def _best(m: dict, keys: tuple[str, ...]) -> tuple[str, dict]:
    """The control with the higher BLEU among its settings (smoothing, tying)."""
    k = max((k for k in keys if k in m), key=lambda k: m[k]["bleu"])
    return k, m[k]


def _pool(res: dict) -> dict:
    """Seed-1 runs by name, tied ones as ``<method>_tied``."""
    return {**res["methods"], **{f"{k}_tied": r for k, r in (res.get("tied") or {}).items()}}


def mhc_pick(pool: dict) -> str:
    """The MHC setting a user would pick without the test set: the lower validation nll of untied / tied."""
    return min((k for k in ("mhc", "mhc_tied") if k in pool), key=lambda k: pool[k]["valid_nll_bits"])


def targets(by_vocab: dict[str, dict]) -> list[dict]:
    """The issue's targets, each with the measured figures and whether it is met (``None``: a run it
    needs has not finished yet). MHC counts with the tying its validation nll picks; controls at the better
    of their settings, dense tied included once MHC is tied (a tied MHC is compared with a tied dense)."""
    out = []

    def row(vocab: str, target: str, need: tuple[str, ...], m: dict, measure) -> dict:
        if any(k not in m for k in need):
            return {"vocab": vocab, "target": target, "measured": "pending", "met": None}
        measured, met = measure(m)
        return {
            "vocab": vocab,
            "target": target,
            "measured": measured,
            "met": None if met is None else bool(met),
        }

    def named(m: dict) -> tuple[str, dict]:
        k = mhc_pick(m)
        return ("MHC tied" if k == "mhc_tied" else "MHC"), m[k]

    def vs_dense(m):
        label, mhc = named(m)
        k, d = _best(m, (*DENSE, "ce_tied"))
        gap = mhc["bleu"] - d["bleu"]
        return f"{mhc['bleu']:.2f} ({label}) vs {d['bleu']:.2f} ({k}; {gap:+.2f})", gap >= -0.5

    def vs_adaptive(m):
        label, mhc = named(m)
        k, d = _best(m, ADAPTIVE)
        gap = mhc["bleu"] - d["bleu"]
        return f"{mhc['bleu']:.2f} ({label}) vs {d['bleu']:.2f} ({k}; {gap:+.2f})", gap >= 0.5

    def nll(m):
        label, mhc = named(m)
        k = "ce_tied" if label == "MHC tied" else "ce"
        gap = mhc["valid_nll_bits"] - m[k]["valid_nll_bits"]
        return (
            f"{mhc['valid_nll_bits']:.3f} ({label}) vs {m[k]['valid_nll_bits']:.3f} ({k}; {gap:+.3f})",
            gap <= 0.1,
        )

    for v, res in by_vocab.items():
        m = _pool(res)
        tied_pick = "mhc" in m and mhc_pick(m) == "mhc_tied"
        dense_need = ("mhc", *DENSE) + (("ce_tied",) if tied_pick else ())
        out += [
            row(
                v,
                "MHC BLEU >= dense BLEU - 0.5 (better of eps 0.1 / 0, tied as MHC)",
                dense_need,
                m,
                vs_dense,
            ),
            row(
                v,
                "MHC BLEU >= adaptive BLEU + 0.5 (better of eps 0 / 0.1)",
                ("mhc", *ADAPTIVE),
                m,
                vs_adaptive,
            ),
            row(
                v,
                "MHC valid nll <= dense (eps 0.1, tied as MHC) + 0.1 bits",
                ("mhc", "ce_tied" if tied_pick else "ce"),
                m,
                nll,
            ),
        ]
        reps = res.get("repeats") or {}
        if reps:

            def seeds(m, reps=reps):
                parts = [
                    f"{k}: {m[k]['bleu']:.2f} / {reps[k]['bleu']:.2f} ({reps[k]['bleu'] - m[k]['bleu']:+.2f})"
                    for k in ("ce", "mhc")
                    if k in reps
                ]
                gaps = [reps[k]["bleu"] - reps["ce"]["bleu"] for k in ("mhc",) if k in reps and "ce" in reps]
                more = f"; MHC - dense at seed 2: {gaps[0]:+.2f}" if gaps else ""
                return "; ".join(parts) + more, None

            out.append(row(v, "seed 1 / seed 2 BLEU (stated)", ("ce", "mhc"), res["methods"], seeds))
        tied = res.get("tied") or {}
        if "mhc" in tied:

            def lever(m, tied=tied):
                t = tied["mhc"]
                k, d = _best(m, DENSE)
                parts = [
                    f"MHC tied {t['bleu']:.2f} BLEU / {t['valid_nll_bits']:.3f} bits vs untied "
                    f"{m['mhc']['bleu']:.2f} / {m['mhc']['valid_nll_bits']:.3f} ({t['bleu'] - m['mhc']['bleu']:+.2f} BLEU)",
                    f"vs dense {d['bleu']:.2f} ({k}; {t['bleu'] - d['bleu']:+.2f})",
                ]
                if "ce" in tied:
                    c = tied["ce"]
                    parts.append(f"dense tied {c['bleu']:.2f} (MHC tied {t['bleu'] - c['bleu']:+.2f})")
                return "; ".join(parts), None

            out.append(row(v, "next lever: tied embeddings (stated)", ("mhc", "ce"), res["methods"], lever))
    big = max(by_vocab, key=int)
    m = by_vocab[big]["methods"]

    def train_speed(m):
        mhc, ad = m["mhc"], m["adaptive"]
        how = "timed alone" if "timing" in mhc and "timing" in ad else "whole-run averages"
        return f"{mhc['train_wps']:,.0f} vs {ad['train_wps']:,.0f} words/s ({how})", mhc["train_wps"] >= ad[
            "train_wps"
        ]

    def gen_speed(m):
        timed = [k for k in DENSE if k in m and "gen_timing" in m[k]]  # the faster one: the stricter bar
        dense = max(timed, key=lambda k: m[k]["gen_sent_per_s"]) if timed else "ce"
        mhc, d = m["mhc"], m[dense]
        alone = "gen_timing" in mhc and "gen_timing" in d
        fixed = mhc.get("gen_timing", {}).get("fixed_len")
        how = (
            ("decoded alone" + (f", {fixed} tokens each" if fixed else "")) if alone else "whole-run decodes"
        )
        gathered = mhc.get("gen_timing", {}).get("gathered")  # the renumbered dictionary's gain, same pass
        extra = (
            f"; MHC {gathered['gen_sent_per_s']:.1f} without renumbering its dictionary" if gathered else ""
        )
        return (
            f"{mhc['gen_sent_per_s']:.1f} vs {d['gen_sent_per_s']:.1f} sentences/s ({dense}, {how}){extra}",
            mhc["gen_sent_per_s"] >= d["gen_sent_per_s"],
        )

    out.append(row(big, "MHC train words/s >= adaptive softmax's", ("mhc", "adaptive"), m, train_speed))
    out.append(row(big, "MHC generation sentences/s >= dense", ("mhc", "ce"), m, gen_speed))
    return out


def verdict_cell(t: dict) -> str:
    """A target's last column: met or not, 'pending' while a run it needs is missing, '-' for a row that
    only states figures (a second seed, a lever)."""
    if t["met"] is None:
        return "pending" if t["measured"] == "pending" else "-"
    return "yes" if t["met"] else "**NO**"


def gen_how(result: dict) -> str:
    """How the report's generation sentences/s were timed, from the timings themselves."""
    t = next(
        (
            r["gen_timing"]
            for res in result["by_vocab"].values()
            for r in res["methods"].values()
            if "gen_timing" in r
        ),
        None,
    )
    if t is None:
        return "only the runs' own decodes"
    if "fixed_len" not in t:  # timings of older reports: each run's trained checkpoint
        return "each trained checkpoint decoded alone, back to back"
    return (
        f"each method decoded alone, back to back (the median of {len(t.get('gen_sent_per_s_each', [0]))} "
        f"decodes), beam {result['config']['beam']}, every hypothesis forced to "
        f"{t['fixed_len']} tokens (the same decoder steps for every method; weights trained "
        f"{t['ckpt_updates']} updates, which do not change the cost of a step); a learned-order MHC on its "
        "dictionary renumbered to the order (docs/fairseq.md), as a user would decode it"
    )


def mhc_shape(c: dict) -> str:
    """The MHC settings of a report's config, in words (older configs: no short list, frequency bins)."""
    sizes, groups = c.get("mhc_head_sizes"), c.get("mhc_groups", 0)
    grouping = "context clusters" if c.get("mhc_grouping") == "context" else "frequency bins"
    shape = (
        f"tail head sizes {sizes}"
        if sizes
        else (f"{groups} tail {grouping}" if groups else "2 balanced heads")
    )
    k = c.get("mhc_shortlist", 0)
    short = (
        f"a short list of |V|//{SHORTLIST_DIVISOR} at the root"
        if k < 0
        else (f"a short list of {k}" if k else "no short list")
    )
    mlp = c.get("mhc_group_mlp_dim", 0)
    return f"{short}, {shape}" + (f", group MLP {mlp} wide" if mlp else ", linear group layer")


def run_threads(result: dict) -> str:
    """Intra-op threads the stored runs trained with (runs made before this was recorded used 1)."""
    n = sorted({r.get("threads", 1) for res in result["by_vocab"].values() for r in res["methods"].values()})
    return "/".join(map(str, n)) or str(result["config"]["threads"])


def budget_words(c: dict) -> str:
    """The training budget of a report's config, per vocabulary size when they differ."""
    per = {int(v): n for v, n in (c.get("max_updates") or {}).items()}
    if len(set(per.values())) > 1:
        return "updates " + ", ".join(f"{n:,} at {v:,}" for v, n in sorted(per.items()))
    return f"{c['max_update']} updates"


def write_report(result: dict, out_dir: Path, stem: str) -> None:
    """``OUT/STEM.{json,md,png}``."""
    write_reports(Path(out_dir) / stem, result, markdown(result, stem), plot)


def markdown(result: dict, stem: str) -> str:
    c = result["config"]
    lines = [
        "# NMT en-de (Debian DDTP + LibreOffice): output layers and their smoothing, same transformer and budget",
        "",
        f"Data: {result['dataset']}. Model: transformer, {c['layers']}+{c['layers']} layers, d={c['dim']}, "
        f"FFN {4 * c['dim']}, {c['heads']} attention heads, untied output layers, dropout 0.1; "
        f"{budget_words(c)} x {c['max_tokens']} tokens, adam (0.9, 0.98) lr {c['lr']}, {c.get('lr_scheduler', 'inverse_sqrt')} "
        f"with {c['warmup']} warm-up updates, clip-norm 1.0, label smoothing as each row says "
        f"(fairseq's adaptive_loss has none; adaptive_label_smoothed_loss is this project's); seed {c.get('seed', 1)}; "
        f"CPU, {run_threads(result)} thread(s) per training run. MHP: 2 balanced heads; MHC: "
        f"{mhc_shape(c)}. "
        f"Test: all {result['test_sentences']} sentences, beam {c['beam']}, "
        "sacreBLEU / chrF on detokenised output vs the raw references.",
        "",
    ]
    missing = [f"{m} at {int(v):,}" for v, res in result["by_vocab"].items() for m in res["missing"]]
    lines += partial_banner(bool(result.get("partial")), missing)
    timed = any("timing" in r for res in result["by_vocab"].values() for r in res["methods"].values())

    def wps(r: dict) -> str:
        run_avg = r.get("train_wps_run", r["train_wps"])
        return f"{r['train_wps']:,.0f} ({run_avg:,.0f})" if "timing" in r else f"{run_avg:,.0f}"

    def gen(r: dict) -> str:
        if "gen_timing" in r:
            return f"{r['gen_sent_per_s']:.1f} ({r['gen_sent_per_s_run']:.1f})"
        return f"({r['gen_sent_per_s']:.1f})" if timed else f"{r['gen_sent_per_s']:.1f}"

    if timed:
        t = next(
            r["timing"]
            for res in result["by_vocab"].values()
            for r in res["methods"].values()
            if "timing" in r
        )
        loads = [
            r["timing"]["load_before"]
            for res in result["by_vocab"].values()
            for r in res["methods"].values()
            if "timing" in r
        ]
        lines += [
            f"Train words/s: each method timed alone, one after another, over {t['updates']} updates after "
            f"{LOG_INTERVAL} start-up updates, {c['threads']} thread(s) (1-min load average before each: "
            f"{min(loads):.2f}-{max(loads):.2f}; about the thread count is the previous timing itself); "
            "in brackets the average over the whole run, which shared the machine with the other runs. "
            f"Generation sentences/s: {gen_how(result)}; in brackets the run's own decode of the test set "
            "(its own lengths, while other runs shared the machine).",
            "",
        ]
    for v, res in result["by_vocab"].items():
        m = res["methods"]
        conv = res["convergence"].get("ce") or convergence([], 0)
        size = f"{res['vocab_size']:,}" if res["vocab_size"] else "?"
        lines += [
            f"## Joint BPE {int(v):,} (|V| = {size}; MHP heads {res['head_sizes']}; "
            f"MHC short list {res.get('mhc_shortlist') or 0:,} + tail heads {res.get('mhc_head_sizes', res['head_sizes'])}; "
            f"adaptive cutoffs {res['adaptive_cutoffs']})",
            "",
            "| method | sacreBLEU | chrF | valid nll (bits) | output-layer params | total params "
            f"| {'train words/s alone (whole run)' if timed else 'train words/s (whole run)'} "
            f"| {'gen sent/s alone (run)' if timed else 'gen sent/s'} |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in METHODS:
            if k not in m:
                lines.append(f"| {NAMES[k]} | pending | | | | | | |")
                continue
            r = m[k]
            lines.append(
                f"| {NAMES[k]} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['valid_nll_bits']:.3f} | "
                f"{r['output_params']:,} | {r['total_params']:,} | {wps(r)} | {gen(r)} |"
            )
        for variant, label in VARIANTS.items():
            for k, r in (res.get(variant) or {}).items():
                lines.append(
                    f"| {NAMES[k]}, {label} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['valid_nll_bits']:.3f} | "
                    f"{r['output_params']:,} | {r['total_params']:,} | ({r['train_wps']:,.0f}) | "
                    f"({r['gen_sent_per_s']:.1f}) |"
                )
        moved = "n/a" if conv["delta_bits"] is None else f"{conv['delta_bits']:+.3f} bits"
        verdict = "converged" if conv["converged"] else "NOT converged - rerun with a larger --max-update"
        if "ce" not in m:
            verdict = "pending (CE not finished)"
        lines += [
            "",
            f"Budget check: CE's valid nll moved {moved} from update {conv['from_update']} to "
            f"{conv['to_update']} (last fifth; converged means |change| < {CONVERGED_BITS}): "
            f"**{verdict}**.",
        ]
        fixed = (res.get("fixed_lr") or {}).get("ce")
        if fixed:
            fc = convergence(fixed["valid_curve"], fixed["num_updates"])
            flat = fc["converged"]
            lines.append(
                f"At a constant learning rate (same budget, `--lr-scheduler fixed`) CE's valid nll moved "
                f"{fc['delta_bits']:+.3f} bits over the last fifth (updates {fc['from_update']}-{fc['to_update']}), "
                f"ending at {fixed['valid_nll_bits']:.3f} bits: "
                + (
                    "**flat: the budget is enough for the dense model**."
                    if flat
                    else "**still falling: the budget limits the dense model here** (the cosine run's flat end "
                    "is the annealing's)."
                )
            )
        lines.append("")
    lines += ["## Targets", "", "| |V| | target | measured | met |", "|---:|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {int(t['vocab']):,} | {t['target']} | {t['measured']} | {verdict_cell(t)} |")
    sc = result.get("scaling") or {}
    if sc:
        lines += [
            "",
            "## Output layers alone",
            "",
            f"d={sc['dim']}; train step = projection + label-smoothed loss fwd+bwd on {sc['tokens']} tokens; "
            f"beam step = full-|V| log-probs for {sc['beam_rows']} rows (64 sentences x beam 5); "
            f"median of {sc['reps']}; MHC hidden width = d, group MLP {sc['by_vocab'][next(iter(sc['by_vocab']))].get('mhc_group_mlp_dim', 0)} wide, "
            f"short list {', '.join(str(r.get('mhc_shortlist', 0)) for r in sc['by_vocab'].values())} (|V|//{SHORTLIST_DIVISOR}).",
            "",
            "| |V| | MHP heads | MHC heads | CE params | MHP params | MHC params | CE step ms | MHP step ms | MHC step ms "
            "| CE beam ms | MHP beam ms | MHC beam ms |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v, r in sc["by_vocab"].items():
            lines.append(
                f"| {int(v):,} | {r['head_sizes']} | {r.get('mhc_head_sizes', r['head_sizes'])} | {r['ce_params']:,} | {r['mhp_params']:,} | {r['mhc_params']:,} "
                f"| {r['ce_train_step_ms']:.1f} | {r['mhp_train_step_ms']:.1f} | {r['mhc_train_step_ms']:.1f} "
                f"| {r['ce_beam_logprobs_ms']:.1f} | {r['mhp_beam_logprobs_ms']:.1f} | {r['mhc_beam_logprobs_ms']:.1f} |"
            )
    lines += ["", f"![validation nll curves]({stem}.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    vocabs = list(result["by_vocab"])
    fig, axes = pyplot().subplots(1, len(vocabs), figsize=(5.5 * len(vocabs), 4), squeeze=False)
    for ax, v in zip(axes[0], vocabs):
        for k, style in zip(METHODS, ("o-", "o--", "^-", "^--", "s-", "d-")):
            if k not in result["by_vocab"][v]["methods"]:
                continue
            curve = result["by_vocab"][v]["methods"][k]["valid_curve"]
            ax.plot([p["updates"] for p in curve], [p["nll_loss"] for p in curve], style, label=k, ms=3)
        ax.set_xlabel("updates")
        ax.set_ylabel("valid nll (bits/token)")
        ax.set_title(f"joint BPE {int(v):,}")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
