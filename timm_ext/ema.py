"""``--model-ema`` of ``mhe-timm-train``: timm's ``ModelEmaV3`` over the whole model (backbone, neck, head).

As in timm's ``train.py``: the EMA is created after the weights are loaded and before the DDP wrapper,
updated after every optimizer update with the global update count (so the first update copies the
weights), evaluated on the same splits as the model and logged in columns of its own
(``valid_ema_top1`` ...). Its state is part of ``last.pt`` (``model_ema``), so ``--resume`` continues
bit-exactly.

Our one departure, on purpose: timm selects ``model_best`` by the EMA's metric alone and keeps both weight
sets in it; ``best.pt`` holds one set, so it takes whichever of the two scored the higher validation
top-1 (the model on a tie) and says which in ``weights``. An EMA with decay 0.9998 trails the model by
thousands of updates, so on a short run timm's rule would keep the worse weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

#: timm's ``--model-ema-decay`` default
DEFAULT_DECAY = 0.9998


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model EMA (timm's meanings)")
    g.add_argument(
        "--model-ema",
        action="store_true",
        help="keep an exponential moving average of the weights (timm ModelEmaV3), evaluate it every epoch",
    )
    g.add_argument(
        "--model-ema-decay",
        type=float,
        default=DEFAULT_DECAY,
        help=f"EMA decay per optimizer update (default: {DEFAULT_DECAY}, as timm)",
    )


def check_ema_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.model_ema_decay <= 1.0:
        raise ValueError(f"--model-ema-decay must be in [0, 1], got {args.model_ema_decay}")


def create_ema(model: torch.nn.Module, args: argparse.Namespace) -> ModelEmaV3 | None:
    """The EMA of ``model`` (already on its device, not yet DDP-wrapped), or None without --model-ema."""
    return ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None


def restore_ema(ema: ModelEmaV3 | None, ckpt: dict, path: str | Path) -> None:
    """Load the EMA state of a resumed checkpoint; an EMA run cannot continue from a checkpoint without one."""
    state = ckpt.get("model_ema")
    if ema is None:
        if state is not None:
            print(f"resume: {path} holds an EMA state; without --model-ema it is not continued", flush=True)
        return
    if state is None:
        raise ValueError(
            f"--model-ema: {path} holds no EMA state (that run was started without --model-ema); "
            f"resume without --model-ema or start a new run"
        )
    ema.module.load_state_dict(state)


def ema_state(ema: ModelEmaV3 | None) -> dict | None:
    return None if ema is None else ema.module.state_dict()


def ema_columns(split: str, res: dict | None) -> dict:
    """Log columns of the EMA's evaluation on ``split`` (none without EMA)."""
    return {} if res is None else {f"{split}_ema_top1": res["top1"], f"{split}_ema_top5": res["top5"]}


def select_weights(top1: float, ema_res: dict | None) -> tuple[float, str]:
    """(selection top-1, "model" or "ema"): the better of the two on validation, the model on a tie."""
    if ema_res is not None and ema_res["top1"] > top1:
        return ema_res["top1"], "ema"
    return top1, "model"
