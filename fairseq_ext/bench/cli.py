"""``python -m fairseq_ext.bench``: the command line, and the loop over vocabularies and methods that skips
every run already in the committed store."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from fairseq_ext.model import MHC_GROUPS
from mhe_plugins.bench.env import machine, set_threads
from mhe_plugins.bench.store import RunStore
from mhe_plugins.heads import codec_for

from . import runs
from .methods import (
    METHODS,
    REPEATED,
    TIEABLE,
    adaptive_cutoffs,
    budgets,
    data_fingerprint,
    for_vocab,
    mhc_codec,
    run_key,
    run_name,
    shortlist_for,
)
from .report import convergence, targets, write_report
from .runs import LOG_INTERVAL, generate, output_params, preprocess, train
from .timing import cached_generation_timings, cached_scaling, cached_timings


def run_store(a: argparse.Namespace) -> RunStore:
    """The committed store of finished runs, ``OUT/runs/NAME/v{V}_{method}.json``."""
    return RunStore(Path(a.out_dir) / "runs" / a.name)


def stored_path(a: argparse.Namespace, vocab: int, method: str) -> Path:
    return run_store(a).path(run_name(vocab, method, a))


def load_stored(path: Path, key: dict) -> dict | None:
    """The stored run when it was made with exactly ``key``, else None (and say why, never silently)."""
    return RunStore(path.parent).load(path.stem, key)


def run_vocab(
    vocab: int,
    chosen: list[str],
    work: Path,
    refs: list[str],
    a: argparse.Namespace,
    on_stored: Callable[[], object] = lambda: None,
) -> dict:
    """Train + decode the chosen methods at one BPE size (each resumable; ``on_stored`` runs after each one
    is stored), then collect the numbers of every method found finished (here or in the committed store)."""
    a = for_vocab(a, vocab)
    langs = tuple(a.langs.split("-"))
    vwork = work / f"v{vocab}"
    data = data_fingerprint(a.data_dir, vocab, langs)  # type: ignore[arg-type]
    methods: dict[str, dict] = {}
    info: dict = {}
    store = run_store(a)
    for method in METHODS:
        key = run_key(vocab, method, a, data)

        def run_one(method: str = method, key: dict = key) -> dict:
            bin_dir = preprocess(a.data_dir, vocab, vwork, langs)  # type: ignore[arg-type]
            size = sum(1 for _ in open(bin_dir / f"dict.{langs[1]}.txt", encoding="utf-8")) + 4  # + specials
            r = train(method, bin_dir, vwork, a, size)
            r.update(generate(method, bin_dir, vwork, refs, a))
            r.update(output_params(r.pop("checkpoint")))
            print(vocab, method, {k: v for k, v in r.items() if k != "valid_curve"}, flush=True)
            return {"key": key, "vocab_size": size, "result": r}

        saved = store.run_or_reuse(
            run_name(vocab, method, a), run_one, key, may_run=method in chosen, on_stored=on_stored
        )
        if saved is not None:
            methods[method] = saved["result"]
            info["vocab_size"] = saved["vocab_size"]
    size = info.get("vocab_size")
    shortlist = shortlist_for(a, size) if size else None
    return {
        "vocab_size": size,
        "head_sizes": list(codec_for("mhp", size).head_sizes) if size else None,
        "mhc_shortlist": shortlist,
        "mhc_head_sizes": list(mhc_codec(size, a.mhc_groups, a.mhc_head_sizes, shortlist).head_sizes)
        if size
        else None,
        "adaptive_cutoffs": (a.adaptive_cutoffs or adaptive_cutoffs(size)) if size else None,
        "methods": methods,
        "missing": [m for m in METHODS if m not in methods],
        "convergence": {k: convergence(r["valid_curve"], r["num_updates"]) for k, r in methods.items()},
        "repeats": stored_variants(vocab, store, a, data, seed=2),
        "fixed_lr": stored_variants(vocab, store, a, data, scheduler="fixed", methods=("ce",)),
        "tied": stored_variants(vocab, store, a, data, tie=True),
    }


def stored_variants(
    vocab: int,
    store: RunStore,
    a: argparse.Namespace,
    data: dict,
    seed: int = 1,
    scheduler: str = "cosine",
    methods: tuple[str, ...] = REPEATED,
    tie: bool = False,
) -> dict:
    """Stored runs of ``methods`` made with another seed, schedule or tying (by their own bench
    invocations), for the report: a repeat at a second seed, CE at a constant learning rate, tied output
    embeddings as the next lever. Never trains."""
    b = argparse.Namespace(**{**vars(a), "seed": seed, "lr_scheduler": scheduler, "tie_embeddings": tie})
    out = {}
    for method in methods:
        found = store.find(run_name(vocab, method, b), run_key(vocab, method, b, data))
        if found is not None:
            out[method] = found["result"]
    return out


def main(argv: list[str] | None = None) -> dict:
    doc = sys.modules[__package__].__doc__  # the package's: what the benchmark does and how it resumes
    p = argparse.ArgumentParser(prog="python -m fairseq_ext.bench", description=doc)
    p.add_argument(
        "--data-dir", type=Path, required=True, help="output of python -m fairseq_ext.datasets ddtp"
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="binarised data + checkpoints (default DATA/bench)"
    )
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="nmt_ende")
    p.add_argument("--langs", default="en-de")
    p.add_argument("--vocabs", default="8000,32000", help="joint BPE sizes; DATA/bpe{V} must exist for each")
    p.add_argument(
        "--train-vocabs",
        default=None,
        help="train only at these of --vocabs (default all); the report still covers every --vocabs size",
    )
    p.add_argument("--report-only", action="store_true", help="train nothing: report the stored runs")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--lr-scheduler",
        choices=("cosine", "inverse_sqrt", "fixed"),
        default="cosine",
        help="cosine anneals to 0 at --max-update, so a fixed budget ends converged for that budget; "
        "inverse_sqrt never anneals: CE's validation nll keeps falling at any budget a CPU affords; fixed "
        "(constant after the warm-up) checks whether the budget, not the annealing, makes the curve flat",
    )
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument(
        "--max-update",
        default="1000",
        help="training budget in updates: one for every --vocabs size, or one per size (e.g. 8000,4000)",
    )
    p.add_argument("--valid-every", type=int, default=200)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument(
        "--gen-fixed-len",
        type=int,
        default=20,
        help="the idle generation timing forces every hypothesis to this many tokens, so every method "
        "runs the same decoder steps (the runs' own decodes keep their lengths)",
    )
    p.add_argument(
        "--gen-reps",
        type=int,
        default=3,
        help="the idle generation timing decodes this many times per method and keeps the median "
        "(one decode varied by about 10 %% here)",
    )
    p.add_argument("--adaptive-cutoffs", default=None, help="default: |V|/4,3|V|/4")
    p.add_argument(
        "--mhc-groups",
        type=int,
        default=MHC_GROUPS,
        help="MHC: top-level groups, --mhe-groups (0 = balanced two levels)",
    )
    p.add_argument(
        "--mhc-group-mlp-dim",
        type=int,
        default=None,
        help="MHC: --mhe-group-mlp-dim (default 4 x --dim, fairseq's default, the decoder FFN width; 0 = linear)",
    )
    p.add_argument("--mhc-head-sizes", default=None, help="MHC: --mhe-head-sizes (overrides --mhc-groups)")
    p.add_argument(
        "--mhc-shortlist",
        type=int,
        default=-1,
        help="MHC: --mhe-shortlist (root short list; -1 = the model's default for each |V|, 0 = none)",
    )
    p.add_argument(
        "--mhc-grouping",
        choices=("frequency", "context"),
        default="context",
        help="MHC tail groups: frequency bins, or python -m fairseq_ext.grouping --method context "
        "(written to WORK/v{V}/ and passed as --mhe-label-order)",
    )
    p.add_argument("--seed", type=int, default=1, help="fairseq --seed of every run (1 = the stored runs')")
    p.add_argument("--scaling-vocabs", default="8000,32000,256000")
    p.add_argument("--scaling-dim", type=int, default=512)
    p.add_argument("--scaling-tokens", type=int, default=512)
    p.add_argument("--scaling-reps", type=int, default=3)
    p.add_argument(
        "--tie-embeddings",
        action="store_true",
        help="tie the output layer's token embeddings to the decoder's input embeddings "
        f"(fairseq's --share-decoder-input-output-embed; methods {', '.join(TIEABLE)}): stored as its own "
        "run (v{V}_{method}_tied), reported beside the untied one",
    )
    p.add_argument(
        "--skip-scaling",
        action="store_true",
        help="skip the timings meant for an idle machine: the output layers alone and --time-updates "
        "(for processes that share the machine; train words/s is then the whole-run average)",
    )
    p.add_argument(
        "--time-updates",
        type=int,
        default=150,
        help="once every run is in, time each method's training alone for this many updates (the first "
        f"{LOG_INTERVAL} left out as start-up); 0 = report whole-run words/s",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="train/decode only these (e.g. parallel processes), then run once with all to report",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per run (1 = robust on a busy CPU)"
    )
    a = p.parse_args(argv)
    if a.mhc_group_mlp_dim is None:
        a.mhc_group_mlp_dim = 4 * a.dim
    runs.THREADS["n"] = a.threads  # every fairseq subprocess gets this many threads
    set_threads(a.threads)
    langs = tuple(a.langs.split("-"))
    if len(langs) != 2 or not all(langs):
        p.error(f"--langs must look like en-de, got {a.langs!r}")
    if a.time_updates and a.time_updates < 2 * LOG_INTERVAL:
        p.error(
            f"--time-updates {a.time_updates}: use 0 (off) or >= {2 * LOG_INTERVAL} (first {LOG_INTERVAL} are start-up)"
        )
    if a.gen_reps < 1 or a.gen_fixed_len < 1:
        p.error(f"--gen-reps ({a.gen_reps}) and --gen-fixed-len ({a.gen_fixed_len}) must be >= 1")
    chosen = [m for m in a.methods.split(",") if m]
    if not chosen or set(chosen) - set(METHODS):
        p.error(f"--methods must be a comma list from {list(METHODS)}, got {a.methods!r}")
    if a.tie_embeddings and set(chosen) - set(TIEABLE):
        p.error(
            f"--tie-embeddings: only {', '.join(TIEABLE)} tie their output layer, got --methods {a.methods}"
        )
    try:
        vocabs = [int(v) for v in a.vocabs.split(",") if v]
    except ValueError:
        p.error(f"--vocabs must be comma-separated ints, got {a.vocabs!r}")
    try:
        train_vocabs = [int(v) for v in a.train_vocabs.split(",") if v] if a.train_vocabs else vocabs
    except ValueError:
        p.error(f"--train-vocabs must be comma-separated ints, got {a.train_vocabs!r}")
    if set(train_vocabs) - set(vocabs):
        p.error(f"--train-vocabs {a.train_vocabs} must be a subset of --vocabs {a.vocabs}")
    try:
        a.max_updates = budgets(a.max_update, vocabs)
    except ValueError as e:
        p.error(str(e))
    if a.lr_scheduler == "cosine" and a.warmup >= min(a.max_updates.values()):
        p.error(f"--lr-scheduler cosine needs --warmup ({a.warmup}) < --max-update ({a.max_update})")
    work = a.work_dir or a.data_dir / "bench"
    refs_path = a.data_dir / "raw" / f"test.{langs[1]}"
    if not refs_path.is_file():
        p.error(f"{refs_path} missing: build DATA with python -m fairseq_ext.datasets ddtp (or sample)")
    refs = refs_path.read_text(encoding="utf-8").splitlines()

    def report() -> dict:
        return collect_and_report([run_vocab(v, [], work, refs, a) for v in vocabs], vocabs, work, refs, a)

    for v in [] if a.report_only else train_vocabs:  # the report is rewritten after every stored run
        run_vocab(v, chosen, work, refs, a, on_stored=report)
    return report()


def collect_and_report(
    results: list[dict], vocabs: list[int], work: Path, refs: list[str], a: argparse.Namespace
) -> dict:
    """Assemble the report from every stored run (``results`` in ``vocabs`` order); write it when any run
    is in (PARTIAL until all are, scaling timed only then)."""
    by_vocab = {str(v): res for v, res in zip(vocabs, results)}
    partial = any(res["missing"] for res in by_vocab.values())
    timed = not (a.skip_scaling or partial or a.time_updates == 0)
    if timed:
        for v, per_method in cached_timings(by_vocab, a, work).items():
            m = by_vocab[v]["methods"]
            for k, t in per_method.items():
                m[k] = {**m[k], "train_wps_run": m[k]["train_wps"], "train_wps": t["train_wps"], "timing": t}
        for v, per_method in cached_generation_timings(by_vocab, a, work).items():
            m = by_vocab[v]["methods"]
            for k, t in per_method.items():
                run_speed = m[k]["gen_sent_per_s"]
                m[k] = {
                    **m[k],
                    "gen_sent_per_s_run": run_speed,
                    "gen_sent_per_s": t["gen_sent_per_s"],
                    "gen_timing": t,
                }
    stats_path = a.data_dir / "stats.json"
    first = str(vocabs[0])
    result = {
        "partial": partial,
        "methods": by_vocab[first]["methods"],  # the first --vocabs size; every size under by_vocab
        "methods_vocab": vocabs[0],
        "by_vocab": by_vocab,
        "targets": targets(by_vocab),
        "scaling": {} if a.skip_scaling or partial else cached_scaling(work / "scaling.json", a),
        "config": {
            **{k: v for k, v in vars(a).items() if not isinstance(v, Path)},
            "threads": a.threads,
            "machine": machine(),
        },
        "dataset": json.loads(stats_path.read_text())["splits"] if stats_path.exists() else str(a.data_dir),
        "test_sentences": len(refs),
    }
    if not any(res["methods"] for res in by_vocab.values()):
        return result
    for res in by_vocab.values():
        for k, r in res["methods"].items():
            if not math.isfinite(r["bleu"]) or r["valid_nll_bits"] is None:
                raise RuntimeError(f"{k}: no BLEU / validation nll recorded")
    write_report(result, a.out_dir, a.name)
    return result
