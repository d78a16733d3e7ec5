"""What one run of the NMT benchmark is: the four output layers, their fairseq arguments, run dirs and keys.

Why apart: the run dir and the run key decide what a rerun resumes or reuses, so they are written once and
read by training, timing and reporting alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fairseq_ext.model import SHORTLIST_DIVISOR, codec_from_args, default_shortlist
from mhe_plugins import LabelCodec
from mhe_plugins.bench.store import settings_key

LS = ["--label-smoothing", "0.1", "--report-accuracy"]


MHE = ["--arch", "transformer_mhe", "--criterion", "mhe_cross_entropy", "--mhe-heads", "2", *LS]


METHODS = {
    "ce": ["--arch", "transformer", "--criterion", "label_smoothed_cross_entropy", *LS],
    # the same dense layer without label smoothing: which part of a gap is smoothing
    "ce0": [
        "--arch",
        "transformer",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0",
        "--report-accuracy",
    ],
    # adaptive_loss takes no label smoothing; it refuses torch's DDP, hence legacy_ddp (also on one CPU)
    "adaptive": ["--arch", "transformer", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"],
    # ... and this project's label-smoothed adaptive loss (fairseq_ext.adaptive_criterion), eps as for ce
    "adaptive_ls": [
        "--arch",
        "transformer",
        "--criterion",
        "adaptive_label_smoothed_loss",
        "--label-smoothing",
        "0.1",
        "--ddp-backend",
        "legacy_ddp",
    ],
    "mhp": [*MHE, "--mhe-method", "mhp"],
    "mhc": [*MHE, "--mhe-method", "mhc"],
}


NAMES = {
    "ce": "dense, eps 0.1 (label_smoothed_cross_entropy)",
    "ce0": "dense, eps 0 (label_smoothed_cross_entropy)",
    "adaptive": "fairseq adaptive softmax (adaptive_loss, no smoothing)",
    "adaptive_ls": "adaptive softmax, eps 0.1 (adaptive_label_smoothed_loss)",
    "mhp": "MHP (mhe_cross_entropy, --mhe-method mhp)",
    "mhc": "MHC (mhe_cross_entropy, --mhe-method mhc)",
}
ADAPTIVE = ("adaptive", "adaptive_ls")
TIEABLE = ("ce", "ce0", "mhc")  # output layers whose token embeddings can be the decoder's input embeddings
TIE = "--share-decoder-input-output-embed"


def adaptive_cutoffs(vocab_size: int) -> str:
    """Head cluster = the most frequent quarter of the dictionary, two tail clusters (fairseq's usual 3)."""
    return f"{vocab_size // 4},{vocab_size * 3 // 4}"


def model_args(dim: int, layers: int, heads: int) -> list[str]:
    a = []
    for side in ("encoder", "decoder"):
        a += [f"--{side}-embed-dim", str(dim), f"--{side}-ffn-embed-dim", str(4 * dim)]
        a += [f"--{side}-layers", str(layers), f"--{side}-attention-heads", str(heads)]
    return a


def method_args(method: str, vocab_size: int, a: argparse.Namespace) -> list[str]:
    if tied(a):
        if method not in TIEABLE:
            raise ValueError(f"--tie-embeddings: {method} cannot tie its output layer (only {list(TIEABLE)})")
        return _method_args(method, vocab_size, a) + [TIE]
    return _method_args(method, vocab_size, a)


def _method_args(method: str, vocab_size: int, a: argparse.Namespace) -> list[str]:
    if method in ADAPTIVE:
        return METHODS[method] + [
            "--adaptive-softmax-cutoff",
            a.adaptive_cutoffs or adaptive_cutoffs(vocab_size),
        ]
    if method == "mhc":
        shape = (
            ["--mhe-head-sizes", a.mhc_head_sizes]
            if a.mhc_head_sizes
            else ["--mhe-groups", str(a.mhc_groups)]
        )
        shape += ["--mhe-shortlist", str(shortlist_for(a, vocab_size))]
        return METHODS[method] + [*shape, "--mhe-group-mlp-dim", str(a.mhc_group_mlp_dim)]
    return METHODS[method]


REPEATED = ("ce", "mhc")  # methods a --seed 2 run repeats (the report states the BLEU difference)


def tied(a: argparse.Namespace) -> bool:
    """``--tie-embeddings``: the output layer's token embeddings are the decoder's input embeddings."""
    return bool(getattr(a, "tie_embeddings", False))


def run_name(vocab: int, method: str, a: argparse.Namespace) -> str:
    """``v{V}_{method}``, plus ``_seed{N}``, ``_tied`` and ``_{scheduler}`` when not the defaults (seed 1,
    untied, cosine), so a repeat, a variant or a schedule check never overwrites the run it is compared with."""
    name = f"v{vocab}_{method}"
    name += f"_seed{_variant(a)[0]}" if _variant(a)[0] != 1 else ""
    name += "_tied" if tied(a) else ""
    return name + (f"_{a.lr_scheduler}" if a.lr_scheduler != "cosine" else "")


def shortlist_for(a: argparse.Namespace, vocab_size: int) -> int:
    """``--mhc-shortlist``: -1 (the default) is the model's default for this vocabulary size."""
    k = _variant(a)[1]
    return default_shortlist(vocab_size) if k < 0 else k


def mhc_codec(vocab_size: int, groups: int, head_sizes: str | None = None, shortlist: int = 0) -> LabelCodec:
    """The (tail) codec ``transformer_mhe --mhe-method mhc`` builds from the bench's MHC options (the
    model's own rule)."""
    shape = argparse.Namespace(
        mhe_method="mhc",
        mhe_groups=groups,
        mhe_head_sizes=head_sizes,
        mhe_heads=None,
        mhe_shortlist=shortlist,
    )
    return codec_from_args(shape, vocab_size)


def method_settings(method: str, a: argparse.Namespace) -> dict:
    """The bench options that shape only this method's output layer (part of its run key and dir); the
    short list and grouping only when set, so runs stored before they existed keep their keys."""
    seed, shortlist, grouping = _variant(a)
    out = {"seed": seed} if seed != 1 else {}
    if tied(a):
        out["tied"] = True
    if method == "mhc":
        out.update({k: getattr(a, k) for k in ("mhc_groups", "mhc_group_mlp_dim", "mhc_head_sizes")})
        if shortlist:  # -1: the model's default rule, which is part of the key
            out["mhc_shortlist"] = shortlist if shortlist > 0 else f"|V|//{SHORTLIST_DIVISOR}"
        if grouping != "frequency":
            out["mhc_grouping"] = grouping
    return out


def method_tag(method: str, a: argparse.Namespace) -> str:
    """``mhc`` with its shape spelled out (``mhc.g16.mlp512.k2000.context``), so that no run ever resumes
    a checkpoint of a differently shaped output layer; every other method is its name (+ ``.seedN``)."""
    seed_n, shortlist, grouping = _variant(a)
    seed = (f".seed{seed_n}" if seed_n != 1 else "") + (".tied" if tied(a) else "")
    if method != "mhc":
        return method + seed
    tag = method + (".h" + a.mhc_head_sizes.replace(",", "x") if a.mhc_head_sizes else "")
    tag += f".g{a.mhc_groups}" if a.mhc_groups and not a.mhc_head_sizes else ""
    tag += f".mlp{a.mhc_group_mlp_dim}" if a.mhc_group_mlp_dim else ""
    tag += f".k{shortlist}" if shortlist > 0 else (f".k1of{SHORTLIST_DIVISOR}" if shortlist < 0 else "")
    return tag + (f".{grouping}" if grouping != "frequency" else "") + seed


def _variant(a: argparse.Namespace) -> tuple[int, int, str]:
    """(seed, MHC short list, MHC grouping) of a bench namespace (older ones: 1, none, frequency bins)."""
    return getattr(a, "seed", 1), getattr(a, "mhc_shortlist", 0), getattr(a, "mhc_grouping", "frequency")


def run_dir(work: Path, method: str, a: argparse.Namespace) -> Path:
    """Where one method trains and decodes. inverse_sqrt does not depend on ``--max-update``, so a larger
    budget continues the same run; the cosine schedule anneals to zero at ``--max-update``, so each budget
    is its own run (a killed run still resumes: same dir)."""
    if a.lr_scheduler in ("inverse_sqrt", "fixed"):
        return work / f"{method_tag(method, a)}{'.fixed' if a.lr_scheduler == 'fixed' else ''}"
    return work / f"{method_tag(method, a)}.{a.lr_scheduler}{a.max_update}"


RUN_KEYS = (
    "langs",
    "lr_scheduler",
    "dim",
    "layers",
    "heads",
    "lr",
    "warmup",
    "max_tokens",
    "max_update",
    "valid_every",
    "beam",
    "gen_batch",
    "adaptive_cutoffs",
)  # not --threads: it changes the speed of a run, not what it learns (words/s are timed alone anyway)


def budgets(spec: str, vocabs: list[int]) -> dict[int, int]:
    """``--max-update``: one budget for every size, or one per ``--vocabs`` size, in the same order (a
    larger vocabulary costs more per update, so its converged budget may be set apart)."""
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--max-update must be an int or comma-separated ints, got {spec!r}") from None
    if len(values) == 1:
        values *= len(vocabs)
    if len(values) != len(vocabs) or min(values) < 1:
        raise ValueError(f"--max-update {spec!r}: give one budget >= 1, or one per --vocabs size {vocabs}")
    return dict(zip(vocabs, values))


def for_vocab(a: argparse.Namespace, vocab: int) -> argparse.Namespace:
    """``a`` for one BPE vocabulary: its ``max_update`` budget and the vocabulary itself as ``bpe_vocab``
    (everything per run reads them from here)."""
    return argparse.Namespace(**{**vars(a), "max_update": a.max_updates[vocab], "bpe_vocab": vocab})


def run_key(vocab: int, method: str, a: argparse.Namespace, data: dict) -> dict:
    """Everything that shapes one (vocabulary, method) run; a stored result is reused only on an exact match."""
    key = settings_key(a, RUN_KEYS, vocab=vocab, method=method, data=data)
    return {**key, **method_settings(method, a)}


def data_fingerprint(data_dir: Path, vocab: int, langs: tuple[str, str]) -> dict:
    """Line counts of the BPE'd splits: a stored run is only reused on the same corpus and vocabulary."""
    bpe = data_dir / f"bpe{vocab}"
    out = {}
    for split in ("train", "valid", "test"):
        f = bpe / f"{split}.{langs[1]}"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: build it with python -m fairseq_ext.datasets ddtp")
        with open(f, "rb") as fh:
            out[split] = sum(1 for _ in fh)
    return out
