"""Speed measurements of the NMT benchmark: each method's training timed alone, and the output layers alone.

Why apart from the runs: whole runs share the machine for hours, so their words/s are not comparable; these
timings run one after another once every run is in, and are cached under their run keys.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fairseq_ext.model import SHORTLIST_DIVISOR, default_shortlist
from mhe_plugins.bench.env import load_avg
from mhe_plugins.bench.store import KeyedFile, cached_result
from mhe_plugins.heads import build_head
from mhe_plugins.training import atomic_write_text

from .methods import METHODS, data_fingerprint, for_vocab, method_tag, mhc_codec, run_key
from .runs import (
    LOG_INTERVAL,
    generate_cmd,
    generation_speed,
    label_order_args,
    parse_log,
    preprocess,
    run,
    train_cmd,
    train_words_and_wall,
    tree_ordered_data,
)


def time_training(method: str, bin_dir: Path, vwork: Path, a: argparse.Namespace, vocab_size: int) -> dict:
    """Train words/s of one method timed alone: ``--time-updates`` fresh updates of the run's exact model
    and batches, nothing saved, no validation, the first logged window (start-up) left out.

    Whole runs share the machine for hours with whatever else runs, so their averages are not comparable;
    the bench times the methods one after another instead, so every ratio comes from one machine state
    (the 1-minute load average before each timing is kept, to show what that state was). inverse_sqrt,
    because cosine needs a budget above the warm-up; the schedule does not change the cost of an update.
    """
    save = vwork / "timing" / method_tag(method, a)
    if save.exists():  # an interrupted timing restarts from scratch: its log would mix two runs
        shutil.rmtree(save)
    save.mkdir(parents=True)
    cmd = train_cmd(method, bin_dir, save, a, vocab_size, a.time_updates, "inverse_sqrt")
    load_before = load_avg()
    run([*cmd, "--no-save", "--disable-validation"], save / "train.log")
    timed = parse_log((save / "train.log").read_text(encoding="utf-8"))["train_inner"][1:]
    if not timed:
        raise RuntimeError(f"{save / 'train.log'}: no logged window after the first; raise --time-updates")
    words, wall = train_words_and_wall(timed, [])
    return {
        "train_wps": round(words / wall, 1),
        "updates": int(timed[-1]["num_updates"]) - int(timed[0]["num_updates"]) + LOG_INTERVAL,
        "load_before": round(load_before, 2),
    }


def _cached_per_run(
    by_vocab: dict[str, dict],
    a: argparse.Namespace,
    work: Path,
    measure_one,
    key_extras: dict,
    name_suffix: str,
    desc: str,
) -> dict[str, dict]:
    """``measure_one(method, bin_dir, vwork, a_for_vocab, vocab_size)`` for every finished (vocabulary,
    method), one after another; each result is kept in ``WORK/timing.json`` under its run key plus
    ``key_extras``, so an interrupted rerun measures only what is missing."""
    done = KeyedFile(work / "timing.json")
    langs = tuple(a.langs.split("-"))
    out: dict[str, dict] = {}
    todo = [(v, m) for v, res in by_vocab.items() for m in METHODS if m in res["methods"]]
    for v, method in tqdm(todo, desc=desc):
        data = data_fingerprint(a.data_dir, int(v), langs)  # type: ignore[arg-type]
        av = for_vocab(a, int(v))
        key = {**run_key(int(v), method, av, data), **key_extras}

        def measure(v: str = v, method: str = method, av: argparse.Namespace = av) -> dict:
            vwork = work / f"v{v}"
            bin_dir = preprocess(a.data_dir, int(v), vwork, langs)  # type: ignore[arg-type]
            return measure_one(method, bin_dir, vwork, av, by_vocab[v]["vocab_size"])

        out.setdefault(v, {})[method] = done.get_or_compute(f"{v}:{method}{name_suffix}", key, measure)
    return out


def cached_timings(by_vocab: dict[str, dict], a: argparse.Namespace, work: Path) -> dict[str, dict]:
    """``time_training`` for every finished (vocabulary, method), cached in ``WORK/timing.json``."""
    return _cached_per_run(
        by_vocab,
        a,
        work,
        time_training,
        {"time_updates": a.time_updates},
        "",
        "timing train words/s, one method at a time",
    )


GEN_CKPT_UPDATES = 10


def time_generation(method: str, bin_dir: Path, vwork: Path, a: argparse.Namespace, vocab_size: int) -> dict:
    """Generation sentences/s of one method decoded alone (the median of ``--gen-reps`` decodes), every
    hypothesis forced to ``--gen-fixed-len`` tokens: the full test set, beam ``--beam``, from a checkpoint of
    the run's exact model trained ``GEN_CKPT_UPDATES`` updates (kept under WORK/timing, so no run's
    checkpoint is needed).

    Why a fixed length and not the trained run: a step costs the same whatever the weights, but a trained
    model's own lengths differ by method, and the run's checkpoint does not survive a new machine; forcing
    the length makes every method run the same decoder steps, so the ratio is the cost of a step.
    MHC with a learned order is timed in the layout docs/fairseq.md recommends (dictionary renumbered to
    the order: no gather) and, under ``gathered``, with the order file over the original ids.
    """
    tag = method_tag(method, a)
    layouts = {"": tree_ordered_data(method, bin_dir, vwork, a, vocab_size)}
    if layouts[""][0] != bin_dir:
        layouts["gathered"] = (bin_dir, label_order_args(method, bin_dir, vwork, a, vocab_size))
    load_before = load_avg()
    out: dict = {"fixed_len": a.gen_fixed_len, "ckpt_updates": GEN_CKPT_UPDATES}
    for layout, (data, order_args) in layouts.items():
        name = tag + (".tree" if data != bin_dir else "")
        ckpt = _warm_checkpoint(method, data, vwork / "timing" / f"genckpt.{name}", a, vocab_size, order_args)
        timed = _median_decode(data, ckpt, vwork / "timing" / f"gen.{name}", a)
        if layout:
            out[layout] = timed
        else:
            out.update(timed)
    if "gathered" in layouts:
        out["dictionary"] = "renumbered to the cascade order (grouping --dict-out)"
    return {**out, "load_before": round(load_before, 2)}


def _warm_checkpoint(
    method: str, data: Path, ckdir: Path, a: argparse.Namespace, vocab_size: int, order_args: list[str]
) -> Path:
    """The run's exact model trained ``GEN_CKPT_UPDATES`` updates into ``ckdir`` (kept once DONE)."""
    if not (ckdir / "DONE").is_file():  # an interrupted warm-up restarts from scratch
        if ckdir.exists():
            shutil.rmtree(ckdir)
        ckdir.mkdir(parents=True)
        cmd = train_cmd(method, data, ckdir, a, vocab_size, GEN_CKPT_UPDATES, "inverse_sqrt")
        run([*cmd, *order_args, "--disable-validation"], ckdir / "train.log")
        atomic_write_text(f"{GEN_CKPT_UPDATES}\n", ckdir / "DONE")
    return ckdir / "checkpoint_last.pt"


def _median_decode(data: Path, ckpt: Path, out: Path, a: argparse.Namespace) -> dict:
    """The median of ``--gen-reps`` fixed-length decodes (one varied by about 10 % on an idle machine)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    speeds = []
    for rep in range(a.gen_reps):
        log = out / f"generate.{rep}.log"
        speeds.append(generation_speed(run(generate_cmd(data, ckpt, a, fixed_len=a.gen_fixed_len), log), log))
    sent_s, seconds = sorted(speeds)[len(speeds) // 2]
    return {"gen_sent_per_s": sent_s, "gen_seconds": seconds, "gen_sent_per_s_each": [s for s, _ in speeds]}


def cached_generation_timings(
    by_vocab: dict[str, dict], a: argparse.Namespace, work: Path
) -> dict[str, dict]:
    """``time_generation`` for every finished (vocabulary, method), back to back; kept in
    ``WORK/timing.json`` under the run key like the training timings."""
    extras = {
        "timing": "generation",
        "fixed_len": a.gen_fixed_len,
        "reps": a.gen_reps,
        "ckpt_updates": GEN_CKPT_UPDATES,
        "mhc_dictionary": "renumbered",  # a learned-order MHC is timed on its tree-ordered dictionary
    }
    return _cached_per_run(
        by_vocab, a, work, time_generation, extras, ":gen", "timing generation, one method at a time"
    )


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _scaling_one(v: int, dim: int, tokens: int, rows: int, reps: int, mhc_groups: int) -> dict:
    """MHP balanced, MHC with the model's defaults: the |V| // SHORTLIST_DIVISOR short list, ``mhc_groups``
    tail groups in a learned order (a seeded permutation of the tail stands in for the context clusters:
    decoding then pays the gather back to label ids, as the default model does) and a group MLP 4 x ``dim``
    wide."""
    x = torch.randn(tokens, dim, requires_grad=True)
    y = torch.randint(0, v, (tokens,))
    xr = torch.randn(rows, dim)
    dense = build_head("linear", dim, v, bias=False)
    mhp = build_head("mhp", dim, v, bias=False)
    k = default_shortlist(v)
    mhc_sizes = mhc_codec(v, mhc_groups, shortlist=k)
    order = torch.cat([torch.arange(k), k + torch.randperm(v - k)])
    mhc = build_head(
        "mhc",
        dim,
        v,
        head_sizes=mhc_sizes.head_sizes,
        hidden_dim=dim,
        group_mlp_dim=4 * dim,
        shortlist=k,
        label_order=order,
    )
    loss_kw = {"label_smoothing": 0.1, "smoothing": "label", "reduction": "sum"}

    def dense_step():
        dense(x, y, **loss_kw).loss.backward()

    def mhp_step():
        mhp(x, y, **loss_kw).loss.backward()

    def mhc_step():
        mhc(x, y, **loss_kw).loss.backward()

    @torch.no_grad()
    def dense_lp():
        return dense.log_prob(xr)

    @torch.no_grad()
    def mhp_lp():
        return mhp.log_prob(xr)

    @torch.no_grad()
    def mhc_lp():
        return mhc.log_prob(xr)

    r = {
        "head_sizes": list(mhp.codec.head_sizes),
        "mhc_head_sizes": list(mhc_sizes.head_sizes),
        "mhc_shortlist": k,
        "mhc_group_mlp_dim": 4 * dim,
        "ce_params": dense.classifier_parameters(),
        "mhp_params": mhp.classifier_parameters(),
        "mhc_params": mhc.classifier_parameters(),
    }
    for name, step, lp in (
        ("ce", dense_step, dense_lp),
        ("mhp", mhp_step, mhp_lp),
        ("mhc", mhc_step, mhc_lp),
    ):
        r[f"{name}_train_step_ms"] = 1e3 * _time(step, reps)
        r[f"{name}_beam_logprobs_ms"] = 1e3 * _time(lp, reps)
    for name in ("mhp", "mhc"):
        r[f"{name}_train_step_speedup"] = r["ce_train_step_ms"] / r[f"{name}_train_step_ms"]
        r[f"{name}_beam_logprobs_speedup"] = r["ce_beam_logprobs_ms"] / r[f"{name}_beam_logprobs_ms"]
    return {k: (round(val, 3) if isinstance(val, float) else val) for k, val in r.items()}


def scaling(vocabs: list[int], dim: int, tokens: int, rows: int, reps: int, mhc_groups: int) -> dict:
    """Output layers alone: params, train step (fwd+bwd of projection + loss), one beam step's log-probs."""
    torch.manual_seed(0)
    res = {
        str(v): _scaling_one(v, dim, tokens, rows, reps, mhc_groups)
        for v in tqdm(vocabs, desc="output-layer scaling")
    }
    return {"dim": dim, "tokens": tokens, "beam_rows": rows, "reps": reps, "by_vocab": res}


def cached_scaling(path: Path, a: argparse.Namespace) -> dict:
    """Scaling numbers are reused when the settings match, so a re-run only re-parses the logs."""
    key = {
        "vocabs": a.scaling_vocabs,
        "dim": a.scaling_dim,
        "tokens": a.scaling_tokens,
        "reps": a.scaling_reps,
        "methods": ["ce", "mhp", "mhc"],
        "mhc_groups": a.mhc_groups,
        "mhc_group_mlp_dim": 4 * a.scaling_dim,
        "mhc_shortlist": f"|V|//{SHORTLIST_DIVISOR}",
        "log_prob": "reused buffers",  # the beam-step timing of MHC changed with them: not reused from before
        "mhc_label_order": "permuted tail",  # as the default's learned grouping: decoding gathers to label ids
    }
    vocabs = [int(v) for v in a.scaling_vocabs.split(",")]
    return cached_result(
        path, key, lambda: scaling(vocabs, a.scaling_dim, a.scaling_tokens, 320, a.scaling_reps, a.mhc_groups)
    )
