"""Training loop: AdamW + warmup, gradient accumulation, AMP on CUDA, SWA, validation-based selection,
atomic checkpoints with ``resume``, DDP under torchrun.

Fixed reference bugs: evaluation restores train mode; model selection uses the validation split only;
all labels are used; SWA lives in a separate ``AveragedModel`` so raw weights are never swapped;
gradient accumulation steps after every ``grad_accum`` micro-batches (not at step 0).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from mhe_plugins import metrics as M
from mhe_plugins.distributed import barrier, init_distributed_from_env
from mhe_plugins.training import (
    JsonlLogger,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from xmc.batching import Collator, IndexDataset, to_device
from xmc.data import XMCDataset, load_dataset
from xmc.encoders import TfidfFeaturizer, l2_rows, load_tokenizer
from xmc.evaluate import compute_metrics, rank_documents
from xmc.model import XMCModel


@dataclass
class TrainConfig:
    data_dir: str
    output: str
    format: str = "auto"  # raw | bow | auto
    head: str = "mhc"  # mhc | flat
    encoder: str = "tfidf"  # tfidf | hf
    model_path: str | None = None  # local HF model dir (encoder=hf)
    num_groups: int | None = None  # default ~ sqrt(N) (balanced two-head split)
    candidates_topk: int | None = None  # default ~ sqrt(G), >= 16
    hidden_dim: int | None = None  # MHC label-embedding width; default feature_dim // 4 in [32, 300]
    permutation_seed: int | None = None  # random label-id permutation before grouping
    epochs: int = 5
    batch_size: int = 128
    lr: float | None = None  # default 2e-3 (tfidf) / 1e-4 (hf)
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of optimizer steps
    grad_accum: int = 1
    amp: bool = True  # only on CUDA
    swa: bool = True
    swa_start: int | None = None  # epoch (0-based) at which averaging starts; default epochs // 2
    swa_every: int = 50  # optimizer steps between SWA updates
    eval_every: int = 0  # optimizer steps between validations (0: once per epoch)
    select_metric: str = "P@5"
    dropout: float | None = None  # default 0.2 (tfidf) / 0.5 (hf)
    tfidf_dim: int = 512
    max_features: int = 100_000
    feature_layers: int = 5
    max_len: int = 128
    valid_size: float = 0.05  # used only when the dataset has no valid split
    propensity_a: float = 0.55
    propensity_b: float = 1.5
    seed: int = 6088
    threads: int | None = None
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None  # stop early (smoke tests); None = full epochs
    progress: bool = True

    def model_cfg(self) -> dict:
        hf = self.encoder != "tfidf"
        return {
            "encoder": self.encoder,
            "head": self.head,
            "model_path": self.model_path,
            "num_groups": self.num_groups,
            "candidates_topk": self.candidates_topk,
            "hidden_dim": self.hidden_dim,
            "permutation_seed": self.permutation_seed,
            "dropout": self.dropout if self.dropout is not None else (0.5 if hf else 0.2),
            "tfidf_dim": self.tfidf_dim,
            "feature_layers": self.feature_layers,
            "max_len": self.max_len,
        }


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _warmup_linear(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class _Featurised:
    """Per-split encoder inputs (TF-IDF matrices are computed once) and the saved featurizer state."""

    def __init__(self, cfg: TrainConfig, ds: XMCDataset, out: Path):
        self.tokenizer = self.featurizer = None
        self.features: dict = {}
        self.num_features = ds.num_features
        if cfg.encoder == "tfidf":
            if ds.format == "raw":
                path = out / "tfidf.json"
                if cfg.resume and path.exists():
                    self.featurizer = TfidfFeaturizer.load(path)
                else:
                    self.featurizer = TfidfFeaturizer(max_features=cfg.max_features).fit(
                        ds.splits["train"].texts
                    )
                self.num_features = self.featurizer.num_features
                self.features = {s: self.featurizer.transform(p.texts) for s, p in ds.splits.items()}
            else:
                self.features = {s: l2_rows(p.features) for s, p in ds.splits.items()}
        else:
            if ds.format != "raw":
                raise ValueError(
                    "--encoder hf needs raw text (format raw); BoW files only work with --encoder tfidf"
                )
            self.tokenizer = load_tokenizer(cfg.model_path)

    def collator(self, ds: XMCDataset, split: str, max_len: int) -> Collator:
        part = ds.splits[split]
        return Collator(part.labels, self.features.get(split), part.texts, self.tokenizer, max_len)


def _write_static_files(
    cfg: TrainConfig, ds: XMCDataset, feats: _Featurised, model: XMCModel, out: Path, prop
) -> None:
    meta = {
        "format": ds.format,
        "num_labels": ds.num_labels,
        "num_features": feats.num_features,
        "model": model.cfg,
        "train_config": asdict(cfg),
        "classifier_parameters": model.head.classifier_parameters(),
        "head_resolved": {
            k: getattr(model.head, k, None)
            for k in ("num_groups", "group_size", "candidates_topk", "hidden_dim")
        },
    }
    if cfg.encoder != "tfidf":
        model.encoder.model.config.save_pretrained(out / "encoder")
        feats.tokenizer.save_pretrained(out / "encoder")
    if feats.featurizer is not None:
        feats.featurizer.save(out / "tfidf.json")
    atomic_write_text("".join(t + "\n" for t in ds.label_vocab), out / "labels.txt")
    with open(out / ".propensities.tmp.npy", "wb") as fh:
        np.save(fh, prop.astype(np.float32))
    (out / ".propensities.tmp.npy").replace(out / "propensities.npy")
    atomic_write_json(meta, out / "config.json")


def train(cfg: TrainConfig) -> dict:
    """Train, selecting on validation; returns a summary (best validation metrics, timings, sizes)."""
    rank, world, device = init_distributed_from_env()
    if cfg.device:
        device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.output)
    if out.exists() and (out / "checkpoint.pt").exists() and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out} already holds a training run: pass --resume to continue or --overwrite")
    # data is read and validated before anything is written
    ds = load_dataset(cfg.data_dir, cfg.format, valid_size=cfg.valid_size)
    feats = _Featurised(cfg, ds, out)
    prop = M.jain_propensity(ds.splits["train"].labels, A=cfg.propensity_a, B=cfg.propensity_b)

    model = XMCModel(cfg.model_cfg(), ds.num_labels, feats.num_features).to(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_static_files(cfg, ds, feats, model, out, prop)
    hf = cfg.encoder != "tfidf"
    lr = cfg.lr if cfg.lr is not None else (1e-4 if hf else 2e-3)
    optimizer = _adamw(_param_groups(model, cfg.weight_decay), lr)
    train_col = feats.collator(ds, "train", cfg.max_len)
    valid_col = feats.collator(ds, "valid", cfg.max_len)
    sampler = DistributedSampler(
        IndexDataset(len(ds.splits["train"])), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        IndexDataset(len(ds.splits["train"])),
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=train_col,
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_linear(int(cfg.warmup * total_steps), total_steps)
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    swa_model = AveragedModel(model) if cfg.swa else None
    swa_start = cfg.swa_start if cfg.swa_start is not None else cfg.epochs // 2
    ddp = model
    if world > 1:  # HF encoders carry a pooler the loss never uses
        ddp = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=hf
        )

    start_epoch, step, best, best_epoch, history = 0, 0, -1.0, -1, []
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if swa_model is not None and ck.get("swa") is not None:
            swa_model.load_state_dict(ck["swa"])
        start_epoch, step, best, best_epoch = ck["epoch"] + 1, ck["step"], ck["best"], ck["best_epoch"]
        set_rng_state(ck["rng"])
    logger = JsonlLogger(out / "log.jsonl", enabled=rank == 0)

    def eval_model() -> torch.nn.Module:
        if swa_model is not None and int(swa_model.n_averaged) > 0:
            return swa_model.module
        return model

    def validate(epoch: int, train_loss: float) -> None:
        nonlocal best, best_epoch
        m = eval_model()
        ids, _ = rank_documents(m, valid_col, len(ds.splits["valid"]), 5, cfg.batch_size * 2, device, use_amp)
        res = compute_metrics(ids, ds.splits["valid"].labels, prop)
        rec = {
            "epoch": epoch,
            "step": step,
            "split": "valid",
            **res,
            "train_loss": round(train_loss, 6),
            "lr": scheduler.get_last_lr()[0],
            "swa": m is not model,
            "elapsed_s": round(time.time() - t0, 2),
        }
        history.append(rec)
        logger.log(rec)
        if res[cfg.select_metric] > best:
            best, best_epoch = res[cfg.select_metric], epoch
            if rank == 0:  # the weights that were evaluated, i.e. the SWA average once it exists
                atomic_save(
                    {"state_dict": m.state_dict(), "epoch": epoch, "step": step, "valid": res},
                    out / "model.pt",
                )

    t0 = time.time()
    model.train()
    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0 or not cfg.progress, leave=False
        )
        run_loss, n_loss = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            batch = to_device(batch, device)
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader)
            sync = ddp.no_sync() if (world > 1 and not boundary) else nullcontext()
            with sync, torch.autocast(device.type, enabled=use_amp):
                loss = ddp(batch["inputs"], batch["labels"])
            with sync:
                scaler.scale(loss / cfg.grad_accum).backward()
            run_loss += float(loss.detach())
            n_loss += 1
            if not boundary:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if swa_model is not None and epoch >= swa_start and step % cfg.swa_every == 0:
                swa_model.update_parameters(model)
            bar.set_postfix(loss=f"{run_loss / n_loss:.4f}")
            if cfg.eval_every and step % cfg.eval_every == 0:
                validate(epoch, run_loss / n_loss)
            if cfg.max_steps and step >= cfg.max_steps:
                stop = True
                break
        if swa_model is not None and epoch >= swa_start:
            swa_model.update_parameters(model)  # at least one average per SWA epoch
        if not cfg.eval_every or stop:
            validate(epoch, run_loss / max(1, n_loss))
        if rank == 0:
            atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "swa": swa_model.state_dict() if swa_model is not None else None,
                    "epoch": epoch,
                    "step": step,
                    "best": best,
                    "best_epoch": best_epoch,
                    "rng": rng_state(),
                },
                ckpt_path,
            )
        barrier()
        if stop:
            break
    summary = {
        "best_epoch": best_epoch,
        f"best_valid_{cfg.select_metric}": best,
        "train_s": round(time.time() - t0, 2),
        "steps": step,
        "world_size": world,
        "classifier_parameters": model.head.classifier_parameters(),
        "num_labels": ds.num_labels,
        "history": history,
    }
    if rank == 0:
        atomic_write_text(json.dumps(summary, indent=1) + "\n", out / "train_summary.json")
    return summary
