"""``mhe-face-train CONFIG``: arcface_torch's training loop with MHS-ArcFace in place of Partial FC.

Run it as ``mhe-face-train glyphs_r18_mhs`` (one process, no ``torch.distributed``) or
``torchrun --nproc_per_node N -m insightface_ext.train CONFIG``.  The backbone is DDP-wrapped with a
SUM all-reduce hook (the head's loss is already the global-batch mean), the head is sharded by groups and
never replicated.  SGD + LazySGD, linear warmup then polynomial (power 2) decay, AMP on CUDA, gradient
clipping, atomic checkpoints every ``save_every`` steps, exact resume (mid-epoch), tqdm + JSON-lines logs.

Output dir: ``checkpoints/step-<n>/`` (``state.pt``: backbone, optimizers, schedule, step; ``head_shard_<rank>.pt``
one per rank, re-shardable; ``MANIFEST.json`` written last = the checkpoint is complete), ``model.pt``
(backbone weights, what ``mhe-face-eval`` / ``-export`` read, replaced after each commit), ``train_log.jsonl``,
``config.json``. A run resumes by default from the newest complete checkpoint (a kill mid-save falls back to
the previous one); ``--no-resume`` into a folder holding a run refuses unless ``--overwrite``. Runs written by
earlier versions (root ``checkpoint.pt`` + ``head_shard_<rank>.pt``) are resumed when their steps match.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from mhe_plugins.training import (
    Amp,
    ShardedCheckpoint,
    atomic_save,
    atomic_write_json,
    check_finite_loss,
    load_checkpoint,
    poly_warmup,
    prepare_output_dir,
    release_run_locks,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mhe_plugins.training.dist import (
    DEFAULT_TIMEOUT_S,
    add_dist_timeout_arg,
    barrier,
    cleanup_distributed,
    collective_timeout_guard,
    init_distributed_from_env,
    is_main_process,
    wrap_ddp,
)
from mhe_plugins.training.metric_log import (
    MetricLogger,
    add_metric_log_args,
    numeric_tags,
    open_metric_logger,
)

from .backbones import get_model
from .config import apply_overrides, load_config
from .data import open_train_dataset
from .heads import MHSArcFace
from .optim import LazySGD, sum_allreduce_hook

__all__ = ["train", "build_head", "poly_warmup", "cli", "main", "RUN_FILES", "CHECKPOINTS"]

CHECKPOINTS = "checkpoints"
RUN_FILES = (CHECKPOINTS, "checkpoint.pt", "head_shard_*.pt", "model.pt", "train_log.jsonl", "tensorboard")
STATE = "state.pt"


def build_head(cfg: SimpleNamespace) -> MHSArcFace:
    return MHSArcFace(
        cfg.embedding_size,
        cfg.num_classes,
        head_sizes=cfg.head_sizes,
        margin=cfg.margin_list,
        scale=cfg.scale,
        sample_rate=cfg.sample_rate,
        sparse=True,
    )


def _head_momentum(opt: LazySGD, head: MHSArcFace) -> torch.Tensor | None:
    st = opt.state.get(head.weight, {})
    return st["momentum_buffer"].cpu() if "momentum_buffer" in st else None


def _shard_name(rank: int) -> str:
    return f"head_shard_{rank}.pt"


def _save(
    ck: ShardedCheckpoint, out: Path, step: int, epoch: int, backbone, head, opts, scheds, scaler
) -> None:
    """Every rank writes its head shard, rank 0 the backbone/optimizer state, then commits the manifest
    (the commit point) and only then replaces ``model.pt``."""
    opt_b, opt_h = opts
    shard = head.shard_state()
    shard.update(step=step, world_size=head.world_size, momentum=_head_momentum(opt_h, head))
    ck.write(step, _shard_name(head.rank), shard)
    barrier()
    if is_main_process():
        state = {
            "step": step,
            "epoch": epoch,
            "world_size": head.world_size,
            "backbone": backbone.state_dict(),
            "opt_backbone": opt_b.state_dict(),
            "opt_head_hparams": [{k: v for k, v in g.items() if k != "params"} for g in opt_h.param_groups],
            "sched_backbone": scheds[0].state_dict(),
            "sched_head": scheds[1].state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }
        ck.write(step, STATE, state)
        names = [STATE] + [_shard_name(r) for r in range(head.world_size)]
        ck.commit(step, names, meta={"epoch": epoch, "world_size": head.world_size})
        atomic_save(backbone.state_dict(), out / "model.pt")
    barrier()


def _find_resume(out: Path, ck: ShardedCheckpoint) -> tuple[dict, list[dict], str] | None:
    """(state, head shards, where) of the newest complete checkpoint, or of the pre-manifest layout."""
    ref = ck.latest()
    if ref is not None:
        state = ref.load(STATE)
        # memory-mapped: each rank copies only the blocks of the groups it owns
        shards = [
            load_checkpoint(ref.file(_shard_name(r)), mmap=True) for r in range(int(state["world_size"]))
        ]
        return state, shards, str(ref.path)
    old = out / "checkpoint.pt"
    if not old.is_file():
        return None
    state = load_checkpoint(old)
    shards = []
    for r in range(int(state["world_size"])):
        path = out / _shard_name(r)
        sh = load_checkpoint(path) if path.is_file() else None
        if sh is None or int(sh["step"]) != int(state["step"]):
            found = "missing" if sh is None else f"from step {sh['step']}"
            raise RuntimeError(
                f"{out}: old-layout checkpoint cannot be resumed: checkpoint.pt is from step {state['step']} but "
                f"{path.name} is {found} (a kill between the two files). Start over with --no-resume --overwrite, "
                f"or keep only model.pt (the backbone) for evaluation"
            )
        shards.append(sh)
    return state, shards, str(old)


def _resume(found, backbone, head, opts, scheds, scaler) -> tuple[int, int]:
    ckpt, shards, _ = found
    opt_b, opt_h = opts
    backbone.load_state_dict(ckpt["backbone"])
    head.load_shards(shards)
    if all(s["momentum"] is not None for s in shards):
        opt_h.state[head.weight]["momentum_buffer"] = head.load_shards(shards, key="momentum")
    opt_b.load_state_dict(ckpt["opt_backbone"])
    for g, saved in zip(opt_h.param_groups, ckpt["opt_head_hparams"]):
        g.update(saved)  # lr as scheduled at the checkpoint
    scheds[0].load_state_dict(ckpt["sched_backbone"])
    scheds[1].load_state_dict(ckpt["sched_head"])
    scaler.load_state_dict(ckpt["scaler"])
    if int(ckpt["world_size"]) == head.world_size:
        set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), int(ckpt["epoch"])


def resolve_val_targets(cfg) -> dict[str, Path]:
    """``val_targets`` entries -> .bin paths: a path to a .bin, or a name of ``<rec>/<name>.bin`` (insightface's
    layout). A target that is not found is an error before training starts (arcface_torch skips it silently,
    which hides a typo until the run is over)."""
    paths = {}
    for name in cfg.val_targets:
        path = Path(name)
        if not path.is_file():
            path = Path(cfg.rec) / (name if str(name).endswith(".bin") else f"{name}.bin")
        if not path.is_file():
            raise FileNotFoundError(
                f"val target {name!r}: neither {name} nor {path} is a file; fix or remove it from val_targets"
            )
        paths[Path(name).stem] = path
    return paths


def _validate(cfg, backbone, step: int, log: MetricLogger) -> dict:
    from .verification import evaluate_bin

    results = {}
    for name, path in resolve_val_targets(cfg).items():
        m = evaluate_bin(backbone, path, cfg.val_image_size or cfg.input_size, cfg.in_chans)
        results[name] = m
        log.log({"step": step, "val": name, **m})
        print(f"[mhe-face-train] step {step} {name}: acc {m['acc10fold']:.2f} +- {m['acc10fold_std']:.2f}")
    return results


def face_tags(row: dict) -> dict[str, float]:
    """TensorBoard scalars of a ``train_log.jsonl`` row: a training row's ``train/loss``, ``train/lr``,
    ``train/img_per_s``, ``train/sampled_classes``; a verification row's ``val/<target>/<metric>``."""
    if "val" in row:
        return {f"val/{row['val']}/{k}": v for k, v in numeric_tags(row, skip=("step", "num_pairs")).items()}
    return {f"train/{k}": v for k, v in numeric_tags(row, skip=("step", "epoch")).items()}


def _ensure_model_current(out: Path, backbone: nn.Module) -> bool:
    """Make ``model.pt`` equal the committed backbone (a kill or Ctrl-C between the final checkpoint and
    the ``model.pt`` write left it stale); returns whether it had to be rewritten."""
    path = out / "model.pt"
    want = backbone.state_dict()
    try:
        have = load_checkpoint(path, mmap=True)
        current = have.keys() == want.keys() and all(torch.equal(have[k], want[k].cpu()) for k in want)
    except (FileNotFoundError, RuntimeError):
        current = False
    if not current:
        atomic_save(want, path)
    return not current


def train(cfg: SimpleNamespace, dist_timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Train per ``cfg``; returns ``{"steps", "final_loss", "img_per_s", "val", "output"}``."""
    try:
        return _train(cfg, dist_timeout)
    finally:
        release_run_locks()
        cleanup_distributed()  # a gloo group left alive at exit can abort the process (std::terminate)


def _train(cfg: SimpleNamespace, dist_timeout: float) -> dict:
    rank, world, device = init_distributed_from_env(timeout_s=dist_timeout)
    seed_everything(int(cfg.seed))
    out = prepare_output_dir(
        cfg.output,
        resume=bool(cfg.resume),
        overwrite=bool(cfg.overwrite),
        run_files=RUN_FILES,
        resume_flag="no --no-resume (resuming is the default)",
        main_process=is_main_process(),
    )
    barrier()
    ck = ShardedCheckpoint(out / CHECKPOINTS, keep=2)
    resolve_val_targets(cfg)  # fail now, not after the first epoch
    dataset = open_train_dataset(cfg.rec, channels=cfg.in_chans, train=True)
    if cfg.num_classes is None:
        cfg.num_classes = dataset.num_classes
    if dataset.num_classes > cfg.num_classes:
        raise ValueError(
            f"{cfg.rec}: dataset has {dataset.num_classes} identities > config num_classes={cfg.num_classes}"
        )
    if cfg.num_image is not None and int(cfg.num_image) != len(dataset):
        print(f"[mhe-face-train] note: config num_image={cfg.num_image}, dataset has {len(dataset)} images")
    if is_main_process():
        atomic_write_json(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, out / "config.json"
        )

    backbone = get_model(
        cfg.network, cfg.embedding_size, cfg.input_size, cfg.in_chans, cfg.width, cfg.dropout
    ).to(device)
    head = build_head(cfg).to(device)
    model: nn.Module = backbone
    if world > 1:
        model = wrap_ddp(backbone, device)
        model.register_comm_hook(None, sum_allreduce_hook)
    opt_b = torch.optim.SGD(
        backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    opt_h = LazySGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(cfg.seed), drop_last=True
    )
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.rec}: {len(dataset)} images < one global batch of {cfg.batch_size * world}")
    total = int(cfg.num_epoch * steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    warm = int(cfg.warmup_epoch * steps_per_epoch)
    full_total = int(cfg.num_epoch * steps_per_epoch)  # the schedule does not depend on max_steps

    def lr_lambda(s):
        return poly_warmup(s, full_total, warm)

    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lr_lambda)
    sched_h = torch.optim.lr_scheduler.LambdaLR(opt_h, lr_lambda)
    scaler = Amp(device, enabled=bool(cfg.fp16), growth_interval=100)  # fp16 + loss scaling on CUDA only

    opts, scheds = (opt_b, opt_h), (sched_b, sched_h)
    step = 0
    log = open_metric_logger(
        out / "train_log.jsonl",
        out,
        cfg,
        step_key="step",
        enabled=is_main_process(),
        tags_of=face_tags,
        config={
            k: v for k, v in vars(cfg).items() if isinstance(v, str | int | float | bool | tuple | type(None))
        },
    )
    if cfg.resume and is_main_process():
        for note in ck.recover():
            print(f"[mhe-face-train] {note}")
    barrier()
    found = _find_resume(out, ck) if cfg.resume else None
    if found is not None:
        step, _ = _resume(found, backbone, head, opts, scheds, scaler)
        print(f"[mhe-face-train] resumed from {found[2]} at step {step}")
    log.truncate(lambda r: int(r.get("step", 0)) <= step)  # rows after the checkpoint are logged again
    if found is not None and is_main_process() and cfg.val_targets:
        # a kill between a checkpoint and its validation left that step unvalidated: validate it now
        val_step = step % cfg.verbose == 0 or step % steps_per_epoch == 0 or step == total
        if step > 0 and val_step and not any(r.get("step") == step and "val" in r for r in log.read()):
            _validate(cfg, backbone, step, log)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not is_main_process(), desc="train", dynamic_ncols=True)
    t0, seen, loss_val, val = time.perf_counter(), 0, math.nan, {}
    epoch = step // steps_per_epoch
    with collective_timeout_guard(lambda: f"epoch {epoch} step {step}"):
        while step < total:
            sampler.set_epoch(epoch)
            skip = (step - epoch * steps_per_epoch) * cfg.batch_size  # resume mid-epoch on the same order
            idx = list(sampler)[skip:]
            loader = DataLoader(
                Subset(dataset, idx),
                batch_size=cfg.batch_size,
                shuffle=False,
                drop_last=True,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
                # own generator: creating the iterator must not draw from the global RNG (exact mid-epoch resume)
                generator=torch.Generator().manual_seed(int(cfg.seed) + epoch),
            )
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with scaler.autocast():
                    emb = model(x)
                loss = head(emb, y).loss
                opt_b.zero_grad(set_to_none=True)
                opt_h.zero_grad(set_to_none=True)
                scaler.backward(loss)
                scaler.step([opt_b, opt_h], clip=(backbone.parameters(), cfg.clip_grad))
                sched_b.step()
                sched_h.step()
                step += 1
                seen += x.shape[0] * world
                loss_val = check_finite_loss(loss, epoch=epoch, step=step)
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    ips = seen / (time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{loss_val:.3f}", lr=f"{sched_b.get_last_lr()[0]:.4f}", ips=f"{ips:.0f}"
                    )
                    log.log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_val,
                            "lr": sched_b.get_last_lr()[0],
                            "img_per_s": ips,
                            "sampled_classes": head.last_num_sampled,
                        }
                    )
                end_of_epoch = step % steps_per_epoch == 0
                if step % cfg.save_every == 0 or end_of_epoch or step == total:
                    _save(ck, out, step, epoch + int(end_of_epoch), backbone, head, opts, scheds, scaler)
                if (
                    (step % cfg.verbose == 0 or end_of_epoch or step == total)
                    and is_main_process()
                    and cfg.val_targets
                ):
                    val = _validate(cfg, backbone, step, log)
                if step >= total:
                    break
            epoch += 1
    bar.close()
    log.close()
    if is_main_process() and (step > 0) and _ensure_model_current(out, backbone):
        print(f"[mhe-face-train] rewrote {out / 'model.pt'} from the checkpoint at step {step}")
    elapsed = time.perf_counter() - t0
    return {
        "steps": step,
        "final_loss": loss_val,
        "img_per_s": seen / elapsed if elapsed else math.nan,
        "val": val,
        "output": str(out),
    }


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the console-script entry point)."""
    p = argparse.ArgumentParser(prog="mhe-face-train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="bundled config name (e.g. glyphs_r18_mhs) or path to a config .py")
    p.add_argument("--output", help="override config.output")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start fresh (refused over an existing run unless --overwrite)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="with --no-resume: delete the run in OUTPUT first"
    )
    add_dist_timeout_arg(p)
    add_metric_log_args(p)  # given flags override the config's tensorboard / log_dir / wandb keys
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config entries")
    a = p.parse_args(argv)
    cfg = apply_overrides(load_config(a.config), a.set)
    if a.output:
        cfg.output = a.output
    if a.no_resume:
        cfg.resume = False
    if a.overwrite:
        cfg.overwrite = True
    if not a.tensorboard:
        cfg.tensorboard = False
    if a.wandb:
        cfg.wandb = True
    cfg.log_dir = a.log_dir or cfg.log_dir
    cfg.wandb_project = a.wandb_project or cfg.wandb_project
    return train(cfg, dist_timeout=a.dist_timeout)


def main(argv: list[str] | None = None) -> None:
    cli(argv)


if __name__ == "__main__":
    main()
