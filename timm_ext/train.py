"""``mhe-timm-train``: timm-style training of a timm backbone with an MHE (or linear) head.

timm's own pieces do the work (``create_dataset``/``create_loader``, ``create_optimizer_v2``,
``create_scheduler_v2``, ``Mixup``); the loss goes through the core head's ``compute_loss`` so no B x N
score matrix is built for MHE heads. Per epoch: a row in ``log.jsonl``, then ``last.pt`` (+ ``best.pt`` on
the best validation top-1) committed by the core's ``TrainState`` (``last.pt`` is the commit point; a
``best.pt`` a kill left behind is rolled forward from it), then ``summary.csv`` and ``summary.json``
(rewritten from the checkpoint on resume); ``--resume`` continues exactly where the last commit stopped,
and refuses (saying what is intact) when there is nothing or something unreadable to resume. A folder that
holds a run is never written over unless ``--resume`` or ``--overwrite`` says so; a second trainer on the
same folder is refused by its lock.
Multi-process: ``torchrun --nproc_per_node=K -m timm_ext.train ...`` (DDP; gloo on CPU, nccl on CUDA).
timm's ``--model-ema``, ``--clip-grad``, ``--grad-accum-steps`` and ``--initial-checkpoint`` keep timm's
meanings (the per-step rules in ``train_loop.py``, the EMA in ``ema.py``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ParseKwargs
from tqdm import tqdm

from mhe_plugins.heads import MHSHead
from mhe_plugins.training import (
    Amp,
    TrainState,
    atomic_write_json,
    release_run_locks,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mhe_plugins.training.dist import (
    add_dist_timeout_arg,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    collective_timeout_guard,
    init_distributed_from_env,
    is_main_process,
    wrap_ddp,
)

from .data import build_dataset, build_loader, check_targets, class_map_of, class_names, infer_num_classes
from .ema import add_ema_args, check_ema_args, create_ema, ema_columns, ema_state, restore_ema, select_weights
from .metric_log import add_metric_log_args, open_epoch_logger
from .mixup import DigitMixup, check_mixup_support
from .model import HEADS, MHEClassifier, create_model, head_parameters
from .run_files import plain, prepare_output, summary_dict, write_summaries
from .train_loop import (
    StepOptions,
    add_loop_args,
    check_loop_args,
    load_initial_weights,
    read_run_checkpoint,
    train_one_epoch,
    updates_per_epoch,
)

#: evaluation preprocessing (also written by ``mhe-timm-export``): resize to the input size, no crop
EVAL_INTERPOLATION = "bilinear"
EVAL_CROP_PCT = 1.0


# Default neck width per head, from the glyph benchmark (docs/timm.md, benchmarks/results/glyphs.md): a
# product/cascade head's class vectors are sums/cascades of a few small tables, so the backbone must map every
# image to an arbitrary digit code; a wide neck in front was worth +1.2 (MHP) and +0.4 (MHC) test top-1 at
# 3,755 classes, and costs d x DIM parameters, nothing next to a large-N head.
NECK_DEFAULTS = {"mhp": 1024, "mhc": 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mhe-timm-train", description=__doc__.split("\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", required=True)
    d.add_argument(
        "--dataset", default="", help="'' (ImageFolder), 'glyphs', or a timm name like torch/cifar100"
    )
    d.add_argument("--train-split", default="train")
    d.add_argument(
        "--val-split",
        default="valid",
        help="folder/split name; timm's synonyms are searched too (valid -> val, validation, eval); "
        "a missing split is an error ('.' = DATA_DIR itself)",
    )
    d.add_argument("--extra-eval-split", default=None, help="also evaluate (report only) e.g. 'test'")
    d.add_argument("--num-classes", type=int, default=None, help="default: the training set's class count")
    d.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    d.add_argument("--mean", type=float, nargs="+", default=None)
    d.add_argument("--std", type=float, nargs="+", default=None)
    d.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.0), help="RandomResizedCrop area range")
    d.add_argument("--hflip", type=float, default=0.0)
    d.add_argument("--workers", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="resnet18")
    m.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="timm kwargs k=v")
    m.add_argument("--pretrained", action="store_true")
    m.add_argument("--small-stem", action="store_true", help="drop a ResNet stem's max-pool (32x32 inputs)")
    m.add_argument("--head", default="mhp", choices=HEADS)
    m.add_argument("--head-sizes", type=int, nargs="+", default=None)
    m.add_argument("--num-heads", type=int, default=None, help="MHE heads for the balanced split (default 2)")
    m.add_argument("--loss-variant", default="ce_sum", choices=["ce_sum", "joint_softmax", "bce"], help="MHP")
    m.add_argument("--hidden-dim", type=int, default=256, help="MHC")
    m.add_argument("--beam", type=int, default=8, help="MHC")
    m.add_argument("--mhs-mode", default="per_sample", choices=["per_sample", "batch_union"])
    m.add_argument("--sampled-groups", type=int, default=None, help="MHS")
    m.add_argument(
        "--mhs-sampling-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MHS: sampled-softmax correction of the randomly sampled groups' logits (default: on, the core's "
        "default, measured in docs/timm.md); --no-mhs-sampling-correction turns it off",
    )
    m.add_argument(
        "--head-neck",
        type=int,
        default=None,
        metavar="DIM",
        help="Linear(d, DIM) + BatchNorm + ReLU before the head (any head; counted in head params); "
        f"0 = none. Default: {NECK_DEFAULTS} by head, none otherwise; on --resume, the checkpoint's neck",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--opt", default="sgd")
    o.add_argument("--lr", type=float, default=0.1)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--sched", default="cosine")
    o.add_argument("--warmup-epochs", type=int, default=0)
    o.add_argument("--warmup-lr", type=float, default=1e-4)
    o.add_argument("--min-lr", type=float, default=1e-5)
    o.add_argument("--smoothing", type=float, default=0.0)
    o.add_argument("--mixup", type=float, default=0.0)
    o.add_argument("--cutmix", type=float, default=0.0)
    o.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    o.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap (smoke tests)")
    r = p.add_argument_group("run")
    r.add_argument("--output", required=True)
    r.add_argument("--resume", default=None, help="checkpoint to resume (e.g. OUT/last.pt)")
    r.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in --output and start over"
    )
    add_dist_timeout_arg(r)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    r.add_argument("--no-progress", action="store_true")
    add_metric_log_args(r)  # --log-dir, --no-tensorboard, --wandb, --wandb-project
    add_loop_args(p)
    add_ema_args(p)
    return p


def head_kwargs_from_args(args: argparse.Namespace) -> dict:
    if args.head == "mhc":
        return {"hidden_dim": args.hidden_dim, "beam": args.beam}
    if args.head == "mhs":
        kw: dict[str, Any] = {"mode": args.mhs_mode}
        if args.sampled_groups is not None:
            kw["sampled_groups"] = args.sampled_groups
        if args.mhs_sampling_correction is not None:
            if "sampling_correction" not in inspect.signature(MHSHead.__init__).parameters:
                raise ValueError(
                    "--mhs-sampling-correction: this mhe_plugins' MHSHead has no sampling_correction option"
                )
            kw["sampling_correction"] = bool(args.mhs_sampling_correction)
        return kw
    if args.mhs_sampling_correction is not None:
        raise ValueError(f"--mhs-sampling-correction applies to --head mhs, not --head {args.head}")
    return {}


def loss_kwargs_from_args(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {"label_smoothing": args.smoothing}
    if args.head == "mhp":
        kw["variant"] = args.loss_variant
    return kw


def build_model_from_config(cfg: dict) -> MHEClassifier:
    """Rebuild the exact architecture recorded in a checkpoint's ``config``."""
    return create_model(
        cfg["model"],
        head=cfg["head"],
        num_classes=cfg["num_classes"],
        head_sizes=cfg["head_sizes"],
        small_stem=cfg.get("small_stem", False),
        head_kwargs=cfg.get("head_kwargs") or {},
        in_chans=cfg["input_size"][0],
        neck_dim=cfg.get("neck_dim"),
        **(cfg.get("model_kwargs") or {}),
    )


def _default_norm(in_chans: int, cfg: dict, key: str, given) -> tuple[float, ...]:
    if given:
        if len(given) not in (1, in_chans):
            raise ValueError(f"--{key} needs 1 or {in_chans} values, got {given}")
        return tuple(given) * (in_chans // len(given))
    if in_chans == 1:
        return (0.5,)
    return tuple(cfg.get(key, (0.5,) * in_chans))


@torch.no_grad()
def evaluate(
    model: MHEClassifier, loader, device: torch.device, k: int = 5, progress: bool = False, collect=None
) -> dict:
    """Top-1/top-k accuracy (percent) through the head's exact top-k; summed over DDP ranks.
    ``collect`` (a list) receives this rank's (B, k) top-k ids of every batch, in loader order."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@k, n
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        kk = min(k, model.num_classes)
        _, ids = model.topk(x, kk)
        if collect is not None:
            collect.append(ids.cpu())
        hit = ids == y[:, None]
        stats += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)], device=device)
    stats = all_reduce_sum(stats)
    n = max(stats[2].item(), 1.0)
    return {
        "top1": 100.0 * stats[0].item() / n,
        "top5": 100.0 * stats[1].item() / n,
        "n": int(stats[2].item()),
    }


def resolve_head_neck(args: argparse.Namespace, resumed: dict | None = None) -> int | None:
    """``--head-neck`` as given (0 = none); else the neck of the run being resumed; else the head's default."""
    if args.head_neck is not None:
        if args.head_neck < 0:
            raise ValueError(f"--head-neck must be >= 0 (0 = no neck), got {args.head_neck}")
        return args.head_neck or None
    if resumed is None and args.resume:
        resumed = TrainState(Path(args.resume).parent).load_resume(resume_path(args.resume))
    if resumed is not None:
        return resumed.get("config", {}).get("neck_dim")
    return NECK_DEFAULTS.get(args.head)


def resume_path(resume: str) -> Path:
    """``--resume`` takes a checkpoint file or a run folder (its ``last.pt``)."""
    path = Path(resume)
    return path / "last.pt" if path.is_dir() else path


def train(args: argparse.Namespace) -> dict:
    """Run a training job described by parsed CLI ``args``; returns the summary dict (also summary.json)."""
    try:
        return _train(args)
    finally:
        release_run_locks()


def _train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    check_loop_args(args)
    check_ema_args(args)
    rank, world, device = init_distributed_from_env(timeout_s=args.dist_timeout)
    main = is_main_process()
    ckpts = TrainState(args.output)
    resumed = initial = None
    if args.resume:  # before anything is written: nothing to resume / a damaged checkpoint is an error
        resumed = ckpts.load_resume(resume_path(args.resume), map_location=device)
    elif args.initial_checkpoint:  # read before --overwrite may clear the folder it lives in
        initial = read_run_checkpoint(args.initial_checkpoint, device)
    out = prepare_output(args, main)
    if main:
        for note in ckpts.recover():
            print(f"recovered after an interrupted run: {note}", flush=True)
    barrier()
    check_mixup_support(args.head, args.mixup, args.cutmix)
    seed_everything(args.seed + rank)

    # ---------------------------------------------------------------- data
    in_chans = args.input_size[0] if args.input_size else int(args.model_kwargs.get("in_chans", 3))
    train_ds = build_dataset(args.dataset, args.data_dir, args.train_split, in_chans)
    num_classes = args.num_classes or infer_num_classes(train_ds)
    if args.head_sizes and math.prod(args.head_sizes) < num_classes:
        raise ValueError(
            f"--head-sizes {args.head_sizes} cover {math.prod(args.head_sizes)} ids but the dataset "
            f"{args.data_dir} ({args.train_split}) has {num_classes} classes"
        )
    check_targets(train_ds, num_classes, args.train_split)
    train_classes = class_map_of(train_ds)  # eval splits keep the training ids even if they lack a class
    val_ds = build_dataset(args.dataset, args.data_dir, args.val_split, in_chans, train_classes)
    check_targets(val_ds, num_classes, args.val_split)
    extra_ds = None
    if args.extra_eval_split:
        extra_ds = build_dataset(args.dataset, args.data_dir, args.extra_eval_split, in_chans, train_classes)
        check_targets(extra_ds, num_classes, args.extra_eval_split)

    # ---------------------------------------------------------------- model
    model_kwargs = {k: v for k, v in args.model_kwargs.items() if k != "in_chans"}
    model = create_model(
        args.model,
        head=args.head,
        num_classes=num_classes,
        head_sizes=args.head_sizes,
        num_heads=args.num_heads,
        pretrained=args.pretrained,
        small_stem=args.small_stem,
        head_kwargs=head_kwargs_from_args(args),
        in_chans=in_chans,
        neck_dim=resolve_head_neck(args, resumed if resumed is not None else initial),
        **model_kwargs,
    ).to(device)
    pcfg = model.pretrained_cfg
    input_size = (
        tuple(args.input_size) if args.input_size else (in_chans, *pcfg.get("input_size", (3, 224, 224))[1:])
    )
    mean = _default_norm(in_chans, pcfg, "mean", args.mean)
    std = _default_norm(in_chans, pcfg, "std", args.std)
    config = {
        "model": args.model,
        "model_kwargs": model_kwargs,
        "small_stem": bool(args.small_stem),
        "input_size": list(input_size),
        "mean": list(mean),
        "std": list(std),
        "interpolation": EVAL_INTERPOLATION,
        "crop_pct": EVAL_CROP_PCT,
        "dataset": args.dataset,
        **model.mhe_config(),
    }
    names = class_names(train_ds, num_classes)
    if initial is not None:
        load_initial_weights(model, initial, config, args.initial_checkpoint)

    loader_kw = dict(input_size=input_size, mean=mean, std=std, workers=args.workers, distributed=world > 1)
    train_loader = build_loader(
        train_ds,
        batch_size=args.batch_size,
        is_training=True,
        scale=tuple(args.scale),
        hflip=args.hflip,
        **loader_kw,
    )
    eval_kw = dict(interpolation=EVAL_INTERPOLATION, crop_pct=EVAL_CROP_PCT, **loader_kw)
    val_loader = build_loader(val_ds, batch_size=args.batch_size, is_training=False, **eval_kw)
    extra_loader = (
        build_loader(extra_ds, batch_size=args.batch_size, is_training=False, **eval_kw) if extra_ds else None
    )

    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    steps = (
        len(train_loader)
        if args.max_steps_per_epoch is None
        else min(len(train_loader), args.max_steps_per_epoch)
    )
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch(steps, args.grad_accum_steps),
    )
    amp = Amp(device, enabled=args.amp, cpu_bf16=True)  # --amp: bf16 autocast on CPU, fp16 + scaler on CUDA
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mix_kw = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing)
        if args.head == "linear":
            from timm.data import Mixup

            mixup = Mixup(num_classes=num_classes, **mix_kw)
        else:
            mixup = DigitMixup(model.head.codec, **mix_kw)

    logger = open_epoch_logger(args, out, main)  # log.jsonl + TensorBoard (+ W&B), rank 0 only
    start_epoch, best, history, best_weights = 0, -1.0, [], "model"
    if resumed is not None:
        ckpt = resumed
        old = ckpt.get("config", {})
        if any(old.get(k) != config[k] for k in ("head", "head_sizes", "neck_dim", "num_classes")):
            raise ValueError(f"--resume {args.resume} was trained with a different head: {old}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        amp.load_state_dict(ckpt.get("scaler"))
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt.get("best", -1.0), list(ckpt.get("history", []))
        best_weights = ckpt.get("best_weights", "model")
        if ckpt.get("rng") is not None and world == 1:
            set_rng_state(ckpt["rng"])
        if main:  # rows of epochs after the resumed checkpoint were never committed: drop them
            dropped = logger.truncate(lambda r: r.get("epoch", -1) <= ckpt["epoch"])
            if [r.get("epoch") for r in logger.read()] != [r["epoch"] for r in history]:
                logger.truncate(lambda r: False)  # e.g. resuming another folder's checkpoint: the log
                for row in history:  # becomes exactly the checkpoint's history
                    logger.log(row)
            if dropped:
                print(f"resume: dropped {dropped} log row(s) after epoch {ckpt['epoch']}", flush=True)

    ema = create_ema(model, args)  # after the weights are loaded, before DDP (as timm)
    if resumed is not None:
        restore_ema(ema, resumed, resume_path(args.resume))
    ddp_model = wrap_ddp(model, device)
    loss_kw = loss_kwargs_from_args(args)
    if mixup is not None:
        loss_kw.pop("label_smoothing")  # already inside the mixed soft targets
    head_params = head_parameters(model)
    if main:
        atomic_write_json(
            {"config": config, "args": plain(vars(args)), "head_params": head_params}, out / "config.json"
        )
        atomic_write_json({"num_classes": num_classes, "names": names}, out / "classes.json")
        if history:
            write_summaries(out, summary_dict(config, head_params, best, history, num_epochs, best_weights))

    pos = {"epoch": start_epoch, "step": 0}
    with collective_timeout_guard(lambda: f"epoch {pos['epoch']} step {pos['step']}"):
        for epoch in range(start_epoch, num_epochs):
            pos.update(epoch=epoch, step=0)
            if world > 1 and hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            ddp_model.train()
            t0 = time.time()
            loss_sum = train_one_epoch(epoch, ddp_model, model, train_loader, steps, optimizer, scheduler, amp,
                                       device, loss_kw, StepOptions.from_args(args), mixup, ema, pos,
                                       progress=main and not args.no_progress)  # fmt: skip
            scheduler.step(epoch + 1)
            loss_sum = all_reduce_sum(loss_sum)
            epoch_s = time.time() - t0
            show = main and not args.no_progress
            val = evaluate(model, val_loader, device, progress=show)
            ema_val = evaluate(ema.module, val_loader, device, progress=show) if ema else None
            row = {
                "epoch": epoch,
                "train_loss": loss_sum[0].item() / max(loss_sum[1].item(), 1),
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_s": epoch_s,
                f"{args.val_split}_top1": val["top1"],
                f"{args.val_split}_top5": val["top5"],
                f"{args.val_split}_n": val["n"],
                **ema_columns(args.val_split, ema_val),
            }
            if extra_loader is not None:
                ex = evaluate(model, extra_loader, device, progress=show)
                row.update(
                    {f"{args.extra_eval_split}_top1": ex["top1"], f"{args.extra_eval_split}_top5": ex["top5"]}
                )
                if ema is not None:
                    row.update(ema_columns(args.extra_eval_split, evaluate(ema.module, extra_loader, device)))
            history.append(row)
            score, weights = select_weights(val["top1"], ema_val)  # --model-ema: the better of the two
            is_best = score > best
            best, best_weights = (score, weights) if is_best else (best, best_weights)
            if main:
                img_s = {"train/img_per_s": loss_sum[1].item() / max(epoch_s, 1e-9)}  # not a log.jsonl column
                logger.log(row, extra=img_s)  # before the commit (a resume drops it if that never happens)
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": amp.state_dict(),
                    "model_ema": ema_state(ema),
                    "epoch": epoch,
                    "best": best,
                    "best_weights": best_weights,
                    "history": history,
                    "config": config,
                    "class_names": names,
                    "rng": rng_state(),
                }
                best_state = (
                    {"model": (ema.module if weights == "ema" else model).state_dict(), "weights": weights,
                     "config": config, "class_names": names, "epoch": epoch, "val_top1": score}
                    if is_best
                    else None
                )  # fmt: skip
                ckpts.commit(state, best_state)  # last.pt = the commit point, then best.pt
                write_summaries(
                    out, summary_dict(config, head_params, best, history, num_epochs, best_weights)
                )
                print(
                    f"epoch {epoch}: loss {row['train_loss']:.4f}  {args.val_split} top1 {val['top1']:.2f} "
                    f"top5 {val['top5']:.2f}" + (f"  EMA top1 {ema_val['top1']:.2f}" if ema_val else "")
                    + f"  ({epoch_s:.1f}s)",
                    flush=True,
                )  # fmt: skip
            barrier()
    summary = summary_dict(config, head_params, best, history, num_epochs, best_weights)
    cleanup_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
