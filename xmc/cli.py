"""``mhe-xmc train | eval | predict``: a thin argparse layer over :mod:`xmc.train` and :mod:`xmc.evaluate`.

mhe-xmc train --data-dir DIR --output OUT                       # every other option has a default
torchrun --nproc_per_node 2 -m xmc.cli train --data-dir DIR --output OUT
mhe-xmc eval --model OUT --data-dir DIR [--split test] [--out M.json]   # prints (read-only on OUT)
mhe-xmc predict --model OUT --top-k 5 < texts.txt               # "label:score ..." per line
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from mhe_plugins.training.dist import add_dist_timeout_arg
from mhe_plugins.training.metric_log import add_metric_log_args
from xmc.config import TrainConfig


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data_dir="", output="")
    p.add_argument("--data-dir", required=True, help="dataset directory (raw-text or XC BoW files)")
    p.add_argument("--output", required=True, help="output directory for the model, logs and checkpoints")
    p.add_argument("--format", choices=["auto", "raw", "bow"], default=d.format)
    p.add_argument("--head", choices=["mhc", "flat"], default=d.head)
    p.add_argument(
        "--encoder",
        choices=["auto", "tfidf", "hybrid", "hf"],
        default="auto",
        help="auto (default): hybrid with --model-path, else xmc.config.AUTO_ENCODER (the fine-tuned MiniLM "
        "hybrid when the offline MiniLM is installed and the data are raw texts; otherwise TF-IDF only, said "
        "at start); "
        "tfidf; hybrid = TF-IDF bag + transformer embedding concatenated (LightXML / XR-Transformer); "
        "hf = the transformer alone",
    )
    p.add_argument("--model-path", default=None, help="local HF transformers encoder dir (never downloaded)")
    p.add_argument(
        "--encoder-mode",
        choices=["finetune", "frozen"],
        default=None,
        help="transformer fine-tuned end to end (default) or frozen with its embeddings computed once "
        "and cached per dataset (--embedding-cache)",
    )
    p.add_argument("--pooling", choices=["mean", "cls", "lightxml"], default=None,
                   help="transformer feature (default: mean for hybrid, lightxml for hf)")  # fmt: skip
    p.add_argument(
        "--freeze-layers",
        type=int,
        default=None,
        help="fine-tuning: freeze the input embeddings and the first K transformer layers "
        "(default: xmc.config.FINETUNE_FREEZE_LAYERS for hybrid; -1 trains all)",
    )
    p.add_argument("--encoder-lr", type=float, default=None, help="transformer learning rate (default 1e-4)")
    p.add_argument(
        "--embedding-cache",
        default=None,
        help="folder of the frozen transformer's cached embeddings "
        "(default $MHE_XMC_CACHE or ~/.cache/mhe-xmc/embeddings)",
    )
    p.add_argument("--num-groups", type=int, default=None, help="MHC groups G (default: about sqrt(N))")
    p.add_argument(
        "--candidates-topk",
        type=int,
        default=None,
        help="MHC groups kept per document (default ~sqrt(G), >=16)",
    )
    p.add_argument(
        "--hidden-dim", type=int, default=None, help="MHC label-embedding width (default feature_dim/4)"
    )
    p.add_argument(
        "--permutation-seed", type=int, default=None, help="randomly permute label ids before grouping"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="default 10; 3 when the hybrid fine-tunes its transformer"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 (tfidf) / 1e-4 (HF encoder)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of optimizer steps")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable autocast on CUDA")
    p.add_argument("--no-swa", dest="swa", action="store_false")
    p.add_argument(
        "--swa-start", type=int, default=None, help="epoch where SWA starts (default: the last quarter)"
    )
    p.add_argument("--swa-every", type=int, default=d.swa_every)
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: per epoch)"
    )
    p.add_argument("--select-metric", default=d.select_metric)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--tfidf-dim", type=int, default=d.tfidf_dim)
    p.add_argument(
        "--tfidf-layers",
        type=int,
        default=d.tfidf_layers,
        help="residual MLP blocks after the TF-IDF projection",
    )
    p.add_argument(
        "--dense-grad",
        dest="sparse_grad",
        action="store_false",
        help="dense gradients + AdamW for the TF-IDF bag (default: sparse gradients + SparseAdam)",
    )
    p.add_argument("--ngram-max", type=int, default=d.ngram_max, help="2: add word bigrams (raw text)")
    lex = p.add_mutually_exclusive_group()
    lex.add_argument(
        "--lexical",
        action="store_const",
        const=True,
        default=None,
        help="cosine(document TF-IDF, label/group centroids) with a learned weight in the ranker "
        "(default: on with the TF-IDF encoder)",
    )
    lex.add_argument("--no-lexical", dest="lexical", action="store_const", const=False)
    p.add_argument("--lexical-weight", type=float, default=d.lexical_weight, help="its initial weight")
    p.add_argument("--candidate-loss", choices=["bce", "softmax"], default=d.candidate_loss)
    p.add_argument(
        "--neighbours",
        type=int,
        default=d.neighbours,
        metavar="K",
        help="add the label votes of the K nearest training documents (TF-IDF cosine) at inference; "
        "0 = off (default: 30 with the TF-IDF encoder)",
    )
    p.add_argument(
        "--neighbour-weight", type=float, default=d.neighbour_weight, help="weight of those votes (default 1)"
    )
    rk = p.add_mutually_exclusive_group()
    rk.add_argument(
        "--ranker",
        action="store_const",
        const=True,
        default=None,
        help="fit the learned ranker over the candidates after training (default: xmc.config.RANKER_DEFAULT "
        "with TF-IDF features)",
    )
    rk.add_argument("--no-ranker", dest="ranker", action="store_const", const=False)
    p.add_argument("--ranker-shortlist", type=int, default=d.ranker_shortlist, help="labels it re-ranks")
    p.add_argument(
        "--ranker-negatives", type=int, default=d.ranker_negatives, help="hard negatives per training doc"
    )
    p.add_argument("--ranker-epochs", type=int, default=d.ranker_epochs)
    p.add_argument(
        "--ranker-train-docs",
        type=int,
        default=d.ranker_train_docs,
        help="training documents (a seeded sample) its per-label weights are fitted on; 0 = all",
    )
    p.add_argument("--max-features", type=int, default=d.max_features)
    p.add_argument(
        "--feature-layers", type=int, default=d.feature_layers, help="HF: concat first token of last k layers"
    )
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument(
        "--valid-size", type=float, default=d.valid_size, help="train fraction used as valid if none given"
    )
    p.add_argument("--propensity-a", type=float, default=d.propensity_a)
    p.add_argument("--propensity-b", type=float, default=d.propensity_b)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUTPUT that holds a run")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="seconds a collective waits for a stuck rank before the job fails",
    )
    add_metric_log_args(p)  # --log-dir, --no-tensorboard, --wandb, --wandb-project (TrainConfig fields)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    return TrainConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mhe-xmc", description="Extreme multi-label text classification with MHE"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train_args(sub.add_parser("train", help="train a model (flat or MHC head)"))
    ev = sub.add_parser("eval", help="evaluate a trained model (prints; writes nothing in MODEL)")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data-dir", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="also write the metrics (JSON, percent) to this file")
    ev.add_argument(
        "--no-ranker", dest="ranker", action="store_false", help="rank without the learned ranker"
    )
    add_dist_timeout_arg(ev)
    pr = sub.add_parser("predict", help="top-k labels for each stdin line")
    pr.add_argument("--model", required=True)
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--device", default="cpu")
    pr.add_argument(
        "--no-ranker", dest="ranker", action="store_false", help="rank without the learned ranker"
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        summary = train_cli(args)
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    elif args.cmd == "eval":
        from mhe_plugins.training.dist import (
            cleanup_distributed,
            collective_timeout_guard,
            get_rank,
            init_distributed_from_env,
        )
        from xmc.evaluate import evaluate_model_dir

        init_distributed_from_env(
            timeout_s=args.dist_timeout
        )  # under torchrun batches are sharded over ranks
        rank = get_rank()
        try:
            with collective_timeout_guard(lambda: f"evaluating {args.model} on {args.split}"):
                res = evaluate_model_dir(
                    args.model,
                    args.data_dir,
                    args.split,
                    args.batch_size,
                    args.device,
                    out=args.out,
                    ranker=args.ranker,
                )
        finally:
            cleanup_distributed()
        if rank == 0:
            print(json.dumps({**res, "world_size": int(os.environ.get("WORLD_SIZE", 1))}, indent=1))
    else:
        from mhe_plugins.datasets.lines import split_lines
        from xmc.evaluate import predict_lines
        from xmc.io import InputFileError

        # bytes where there are any: text mode would turn a stray \r into a line break
        buf = getattr(sys.stdin, "buffer", None)
        raw = buf.read().decode("utf-8") if buf is not None else sys.stdin.read()
        lines = split_lines(raw, "<stdin>", InputFileError)
        for row in predict_lines(
            args.model, lines, args.top_k, args.batch_size, args.device, ranker=args.ranker
        ):
            print(" ".join(f"{lab}:{score:.4f}" for lab, score in row))


def train_cli(args: argparse.Namespace) -> dict:
    from mhe_plugins.training.dist import cleanup_distributed
    from xmc.train import train

    try:
        return train(config_from_args(args))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
