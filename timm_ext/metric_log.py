"""``mhe-timm-train``'s metric logger: ``log.jsonl`` (one row per epoch, unchanged) plus the same epoch's
scalars in TensorBoard at step = the row's ``epoch`` (the core's :class:`MetricLogger`).

Why a module of its own: the tag names follow the row's columns (``<split>_top1`` -> ``<split>/top1``), so
EMA or extra-split columns added to the row show up without touching the trainer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mhe_plugins.training.metric_log import MetricLogger, add_metric_log_args, open_metric_logger

__all__ = ["add_metric_log_args", "epoch_tags", "open_epoch_logger"]

#: training columns of an epoch row -> their TensorBoard tag
TRAIN_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "epoch_s": "train/epoch_s"}


def epoch_tags(row: dict[str, Any], splits: tuple[str, ...]) -> dict[str, float]:
    """TensorBoard scalars of one epoch row: ``train/loss``, ``train/lr``, ``train/epoch_s`` and, per
    evaluated split, ``<split>/top1``, ``<split>/top5`` (``<split>/ema_top1`` ...); sample counts are left out."""
    out = {}
    for key, value in row.items():
        if (
            key == "epoch"
            or key.endswith("_n")
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            continue
        split = next((s for s in splits if key.startswith(f"{s}_")), None)
        tag = TRAIN_TAGS.get(key) or (f"{split}/{key[len(split) + 1 :]}" if split else key)
        out[tag] = float(value)
    return out


def open_epoch_logger(args: argparse.Namespace, out: Path, main: bool) -> MetricLogger:
    """``OUT/log.jsonl`` + TensorBoard in ``--log-dir`` (default ``OUT/tensorboard``), rank 0 only."""
    splits = tuple(s for s in (args.val_split, args.extra_eval_split) if s)
    return open_metric_logger(
        out / "log.jsonl",
        out,
        args,
        step_key="epoch",
        enabled=main,
        tags_of=lambda row: epoch_tags(row, splits),
        config={k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))},
    )
