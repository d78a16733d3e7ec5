"""One training epoch of ``mhe-timm-train`` with timm's gradient accumulation, clipping and EMA update, and
the flags that control them (``--grad-accum-steps``, ``--clip-grad``/``--clip-mode``, ``--initial-checkpoint``;
the EMA flags are in :mod:`timm_ext.ema`).

Why a module of its own: ``train.py`` holds the run (data, model, checkpoints); the per-step rules below
follow timm's ``train_one_epoch`` (``train.py`` of pytorch-image-models) and are tested on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import dispatch_clip_grad
from tqdm import tqdm

from mhe_plugins.training import Amp, TrainState, check_finite_loss, load_checkpoint

#: timm's ``--clip-mode`` choices (``timm.utils.dispatch_clip_grad``)
CLIP_MODES = ("norm", "value", "agc")
#: the checkpoint config entries that define the head: an initial checkpoint must agree on all of them
HEAD_KEYS = ("head", "head_sizes", "neck_dim", "num_classes")


def add_loop_args(parser: argparse.ArgumentParser) -> None:
    """The timm flags this module implements, with timm's names, defaults and meanings."""
    g = parser.add_argument_group("timm training options (timm's meanings)")
    g.add_argument(
        "--grad-accum-steps",
        type=int,
        default=1,
        metavar="N",
        help="optimizer step every N micro-batches of --batch-size, loss divided by N; the LR schedule "
        "counts optimizer updates (ceil(steps per epoch / N) per epoch)",
    )
    g.add_argument(
        "--clip-grad", type=float, default=None, metavar="NORM", help="clip gradients (default: off)"
    )
    g.add_argument(
        "--clip-mode",
        default="norm",
        choices=CLIP_MODES,
        help="norm: total L2 norm <= NORM; value: every entry in [-NORM, NORM]; agc: adaptive clipping "
        "with factor NORM, the head left out (as timm)",
    )
    g.add_argument(
        "--initial-checkpoint",
        default=None,
        metavar="PATH",
        help="start from the weights of a mhe-timm-train checkpoint (best.pt / last.pt; its 'model' "
        "weights only: no optimizer, schedule or epoch); the head must be the same",
    )


def check_loop_args(args: argparse.Namespace) -> None:
    """Refuse values timm would silently change (timm clamps --grad-accum-steps to >= 1)."""
    if args.grad_accum_steps < 1:
        raise ValueError(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}")
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise ValueError(f"--clip-grad must be > 0 (omit it for no clipping), got {args.clip_grad}")


def updates_per_epoch(steps: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of ``steps`` micro-batches: a short last group still updates (timm)."""
    return (steps + accum_steps - 1) // accum_steps


def read_run_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A ``mhe-timm-train`` checkpoint, read-only. ``best.pt`` that a kill left older than the run's last
    commit is not read as is: the committed best inside ``last.pt`` is returned (note on stderr)."""
    path = Path(path)
    if path.name == "best.pt" and (path.parent / "last.pt").exists():
        ckpt, note = TrainState(path.parent).load_best(map_location=device)
        if note:
            print(f"{path}: {note}", file=sys.stderr)
    else:
        ckpt = load_checkpoint(path, map_location=device)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a mhe-timm-train checkpoint (needs 'model' and 'config')")
    return ckpt


def load_initial_weights(model: torch.nn.Module, ckpt: dict, config: dict, path: str | Path) -> None:
    """timm's ``--initial-checkpoint``: the checkpoint's model weights into ``model``, nothing else.

    The head must match (kind, sizes, neck, classes): loading another head's digits would be silently
    meaningless, so a difference is an error naming both.
    """
    old = ckpt.get("config", {})
    diff = {k: (old.get(k), config[k]) for k in HEAD_KEYS if old.get(k) != config[k]}
    if diff:
        shown = ", ".join(f"{k} {a!r} in the checkpoint vs {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"--initial-checkpoint {path} was trained with a different head: {shown}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise ValueError(
            f"--initial-checkpoint {path}: its weights do not fit this model "
            f"(--model {config['model']}, --model-kwargs {config['model_kwargs']}): {' '.join(first)}"
        ) from exc


def clip_parameters(model: torch.nn.Module, mode: str) -> list[torch.nn.Parameter]:
    """What timm clips: every parameter; AGC leaves the classifier out (timm drops the head's weights)."""
    params = list(model.parameters())
    if mode != "agc":
        return params
    head = {id(p) for p in model.get_classifier().parameters()}
    return [p for p in params if id(p) not in head]


@dataclass
class StepOptions:
    """The per-step rules of one epoch (from the CLI flags)."""

    accum_steps: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StepOptions:
        return cls(args.grad_accum_steps, args.clip_grad, args.clip_mode)


def train_one_epoch(
    epoch: int,
    ddp_model: torch.nn.Module,
    model: torch.nn.Module,
    loader: Iterable,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    amp: Amp,
    device: torch.device,
    loss_kw: dict,
    opts: StepOptions,
    mixup: Callable | None = None,
    ema: Any = None,
    pos: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Train ``steps`` micro-batches; returns (sum of loss x batch size, samples) as float64.

    timm's ``train_one_epoch``: an optimizer update after every ``accum_steps`` micro-batches and after the
    last one; each micro-batch loss is divided by the size of its group (the last group may be shorter);
    DDP syncs gradients only on the micro-batch that updates; clipping (on unscaled gradients) right
    before the update; ``scheduler.step_update`` and ``ema.update`` get the global update count.
    """
    accum = opts.accum_steps
    per_epoch = updates_per_epoch(steps, accum)
    last_group_start = steps - steps % accum  # micro-batches from here form the short last group
    clip_params = clip_parameters(model, opts.clip_mode) if opts.clip_grad is not None else None
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch}", disable=not progress, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        if pos is not None:
            pos["step"] = step
        update = (step + 1) % accum == 0 or step == steps - 1
        group = accum if step < last_group_start else steps - last_group_start
        x, y = x.to(device), y.to(device)
        target: Any = y
        if mixup is not None:
            x, target = mixup(x, y)
        no_sync = getattr(ddp_model, "no_sync", None)
        with nullcontext() if update or no_sync is None else no_sync():
            with amp.autocast():
                loss = ddp_model(x, target=target, **loss_kw)
            loss_value = check_finite_loss(loss, epoch=epoch, step=step)
            amp.backward(loss / group if group > 1 else loss)
        if update:
            if clip_params is not None:
                amp.unscale_(optimizer)
                dispatch_clip_grad(clip_params, value=opts.clip_grad, mode=opts.clip_mode)
            amp.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            num_updates = epoch * per_epoch + step // accum + 1
            scheduler.step_update(num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
        loss_sum += torch.tensor([loss_value * len(y), len(y)], dtype=torch.float64, device=device)
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
    bar.close()
    return loss_sum
