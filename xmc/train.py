"""Training loop: AdamW (+ SparseAdam for the sparse TF-IDF bag) + warmup, gradient accumulation, AMP on
CUDA, late SWA with raw-vs-averaged selection on validation, kill-safe checkpoints with ``resume``, DDP under
torchrun. The run-folder policy, checkpoints, logs, AMP, schedule and guards are the core's
(:mod:`mhe_plugins.training`).

Fixed reference bugs: evaluation restores train mode; model selection uses the validation split only;
all labels are used; SWA lives in a separate ``AveragedModel`` so raw weights are never swapped;
gradient accumulation steps after every ``grad_accum`` micro-batches (not at step 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from mhe_plugins import metrics as M
from mhe_plugins.training import (
    Amp,
    TrainState,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_finite_loss,
    prepare_output_dir,
    release_run_locks,
    rng_state,
    seed_everything,
    set_rng_state,
    warmup_linear_decay,
)
from mhe_plugins.training.dist import (
    DEFAULT_TIMEOUT_S,
    barrier,
    collective_timeout_guard,
    init_distributed_from_env,
    wrap_ddp,
)
from mhe_plugins.training.metric_log import open_metric_logger
from xmc.batching import Collator, IndexDataset, to_device
from xmc.data import XMCDataset, load_dataset
from xmc.encoders import TfidfFeaturizer, l2_rows, load_tokenizer
from xmc.evaluate import compute_metrics, rank_documents
from xmc.io import read_lines
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
    epochs: int = 10  # WordNet-XMC plateaus after ~4, FOLDOC-XMC still gains at 12 (docs/xmc.md)
    batch_size: int = 128
    lr: float | None = None  # default 2e-3 (tfidf) / 1e-4 (hf)
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of optimizer steps
    grad_accum: int = 1
    amp: bool = True  # only on CUDA
    swa: bool = True
    swa_start: int | None = None  # epoch (0-based) at which averaging starts; default: the last quarter
    swa_every: int = 50  # optimizer steps between SWA updates
    eval_every: int = 0  # optimizer steps between validations (0: once per epoch)
    select_metric: str = "P@5"
    dropout: float | None = None  # default 0.2 (tfidf) / 0.5 (hf)
    tfidf_dim: int = 512
    tfidf_layers: int = 0  # residual MLP blocks after the TF-IDF projection
    sparse_grad: bool = True  # sparse gradients for the TF-IDF bag, updated by SparseAdam
    ngram_max: int = 1  # 2: word bigrams in the TF-IDF vocabulary (raw text only)
    lexical: bool | None = (
        None  # cosine(doc TF-IDF, label/group centroids) in the ranker; None: on with tfidf
    )
    lexical_weight: float = 10.0  # its initial weight (learned)
    candidate_loss: str = "bce"  # bce | softmax (MHC candidates)
    neighbours: int | None = None  # kNN label votes from K nearest training docs; None: 30 with tfidf; 0: off
    neighbour_weight: float = 1.0  # their weight against the model's label scores (docs/xmc.md)
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
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective waits for a stuck rank
    tensorboard: bool = True  # TensorBoard scalars next to log.jsonl (docs/logging.md)
    log_dir: str | None = None  # their folder; None: OUTPUT/tensorboard
    wandb: bool = False  # also to Weights & Biases (needs wandb installed)
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        choices = {"format": ("auto", "raw", "bow"), "head": ("mhc", "flat"), "encoder": ("tfidf", "hf")}
        choices["candidate_loss"] = ("bce", "softmax")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("epochs", "batch_size", "grad_accum", "swa_every", "tfidf_dim", "ngram_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.neighbours is not None and self.neighbours < 0:
            raise ValueError(f"TrainConfig.neighbours must be >= 0 (0 = off), got {self.neighbours}")
        if self.neighbours and self.encoder != "tfidf":
            raise ValueError("TrainConfig.neighbours needs the TF-IDF encoder (--encoder tfidf)")
        if self.lexical and self.encoder != "tfidf":
            raise ValueError("TrainConfig.lexical needs the TF-IDF encoder (--encoder tfidf)")

    def use_lexical(self) -> bool:
        """The lexical term is on by default with the TF-IDF encoder (it needs sparse input)."""
        return self.lexical if self.lexical is not None else self.encoder == "tfidf"

    def num_neighbours(self) -> int:
        """kNN votes are on by default (30 neighbours) with the TF-IDF encoder (they need sparse input)."""
        if self.neighbours is not None:
            return self.neighbours
        return 30 if self.encoder == "tfidf" else 0

    def swa_start_epoch(self) -> int:
        """SWA averages only the last part of training (default: the last quarter of the epochs)."""
        return self.swa_start if self.swa_start is not None else (3 * self.epochs) // 4

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
            "tfidf_layers": self.tfidf_layers,
            "sparse_grad": self.sparse_grad and not hf,
            "candidate_loss": self.candidate_loss,
            "lexical_weight": self.lexical_weight,
            "neighbours": self.num_neighbours(),
            "neighbour_weight": self.neighbour_weight,
            "neighbour_power": 2.0,
            "feature_layers": self.feature_layers,
            "max_len": self.max_len,
        }


def _check_types(cfg: TrainConfig) -> None:
    """Refuse a config whose field has the wrong type (e.g. ``epochs="5"`` from a JSON file), naming it."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        val, hint = getattr(cfg, f.name), hints[f.name]
        allowed = tuple(t for t in typing.get_args(hint) if isinstance(t, type)) or (hint,)
        if val is None and type(None) in allowed:
            continue
        ok = isinstance(val, allowed) and not (isinstance(val, bool) and bool not in allowed)
        if float in allowed and isinstance(val, int) and not isinstance(val, bool):
            ok = True
        if not ok:
            names = " | ".join(t.__name__ for t in allowed)
            raise TypeError(f"TrainConfig.{f.name} must be {names}, got {val!r} ({type(val).__name__})")


def _sparse_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that receive sparse gradients (the TF-IDF bag with ``sparse=True``)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.EmbeddingBag) and m.sparse]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    sparse = {id(p) for p in _sparse_params(model)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in sparse:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _optimizers(model: torch.nn.Module, weight_decay: float, lr: float) -> list[torch.optim.Optimizer]:
    """AdamW for the dense parameters; SparseAdam (lazy Adam: moments of untouched rows stay put, no weight
    decay) for sparse-gradient bags. Dense AdamW over a 40 M-row bag costs more than the model's forward."""
    opts = [_adamw(_param_groups(model, weight_decay), lr)]
    sparse = _sparse_params(model)
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr))
    return opts


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
                    self.featurizer = TfidfFeaturizer(
                        max_features=cfg.max_features, ngram_max=cfg.ngram_max
                    ).fit(ds.splits["train"].texts)
                self.num_features = self.featurizer.num_features
                self.features = {s: self.featurizer.transform(p.texts) for s, p in ds.splits.items()}
            else:
                if cfg.ngram_max != 1:
                    raise ValueError("--ngram-max needs raw text: BoW files come with their own features")
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
    atomic_write(out / "propensities.npy", lambda fh: np.save(fh, prop.astype(np.float32)))
    atomic_write_json(meta, out / "config.json")


def _check_resume_matches(out: Path, ds: XMCDataset, feats: _Featurised, model: XMCModel) -> None:
    """On ``--resume``, the data and model must be the run's own: labels by name and order, the feature
    space and the model config. Checked before any file is written; a mismatch names the first difference."""
    labels_file = out / "labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"cannot resume: {labels_file} is missing (the run's label names)")
    saved = read_lines(labels_file)
    if saved != list(ds.label_vocab):
        where = next((i for i, (a, b) in enumerate(zip(saved, ds.label_vocab)) if a != b), None)
        detail = (
            f"{len(saved)} labels in the run, {len(ds.label_vocab)} in the data"
            if where is None
            else f"{labels_file.name}:{where + 1} is {saved[where]!r}, the data's label {where + 1} is "
            f"{ds.label_vocab[where]!r}"
        )
        raise ValueError(f"cannot resume {out} on this dataset: its labels differ ({detail})")
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key, now in (("num_features", feats.num_features), ("model", model.cfg), ("format", ds.format)):
        if meta.get(key) != json.loads(json.dumps(now)):
            raise ValueError(
                f"cannot resume {out}: config.json has {key}={meta.get(key)!r}, this run would use {now!r}"
            )


def validation_tags(rec: dict) -> dict[str, float]:
    """TensorBoard scalars of a ``log.jsonl`` validation row: ``train/loss``, ``train/lr``, ``valid/<metric>``
    of the weights kept (``valid/swa_selected`` = 1 when the SWA average won) and, once SWA validates too,
    ``valid_raw/<metric>`` and ``valid_swa/<metric>`` of both candidates."""
    metrics = {k: v for k, v in rec.items() if "@" in k}
    tags = {"train/loss": rec["train_loss"], "train/lr": rec["lr"], "valid/swa_selected": float(rec["swa"])}
    tags.update({f"valid/{k}": v for k, v in metrics.items()})
    if rec.get("other"):
        for name, res in {rec["weights"]: metrics, **rec["other"]}.items():
            tags.update({f"valid_{name}/{k}": v for k, v in res.items()})
    return tags


RUN_FILES = [
    "checkpoint.pt",
    "model.pt",
    "model.pt.prev",
    "model.pt.uncommitted",
    "log.jsonl",
    "train_summary.json",
    "metrics.json",
    "tensorboard",
]


def train(cfg: TrainConfig) -> dict:
    """Train, selecting on validation; returns a summary (best validation metrics, timings, sizes)."""
    try:
        return _train(cfg)
    finally:
        release_run_locks()


def _train(cfg: TrainConfig) -> dict:
    rank, world, device = init_distributed_from_env(timeout_s=cfg.dist_timeout)
    if cfg.device:
        device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.output)
    ckpt = TrainState(out, last="checkpoint.pt", best="model.pt")
    resumed = None
    if cfg.resume:  # before the slow data load and before any write: nothing / a damaged file is an error
        resumed = ckpt.load_resume(map_location="cpu")
    elif (out / "checkpoint.pt").exists() and not cfg.overwrite:
        prepare_output_dir(out, resume=False, overwrite=False, run_files=RUN_FILES, main_process=rank == 0)
    # data is read and validated before anything is written
    ds = load_dataset(cfg.data_dir, cfg.format, valid_size=cfg.valid_size)
    feats = _Featurised(cfg, ds, out)
    prop = M.jain_propensity(ds.splits["train"].labels, A=cfg.propensity_a, B=cfg.propensity_b)

    mcfg = cfg.model_cfg()
    x_tr, y_tr = feats.features.get("train"), ds.splits["train"].labels  # no TF-IDF with an HF encoder
    if cfg.num_neighbours():  # buffer sizes of the neighbour data, known before the model is built
        mcfg["neighbour_nnz"] = {
            "docs": int(x_tr.shape[0]),
            "docs_nnz": int(x_tr.nnz),
            "labels_nnz": int(y_tr.nnz),
        }
    model = XMCModel(mcfg, ds.num_labels, feats.num_features)
    if cfg.use_lexical():  # centroids depend on the head's grouping; the model is rebuilt with their size
        centroids = model.lexical_centroids(x_tr, y_tr)
        mcfg["lexical_nnz"] = int(centroids.nnz)
        seed_everything(cfg.seed)
        model = XMCModel(mcfg, ds.num_labels, feats.num_features)
        model.lexical.set_centroids(centroids)
    if model.neighbours is not None:
        model.neighbours.set_data(x_tr, y_tr)
    model.to(device)
    if resumed is not None:
        _check_resume_matches(out, ds, feats, model)
    prepare_output_dir(
        out, resume=cfg.resume, overwrite=cfg.overwrite, run_files=RUN_FILES, main_process=rank == 0
    )
    if rank == 0 and resumed is None:
        _write_static_files(cfg, ds, feats, model, out, prop)
    hf = cfg.encoder != "tfidf"
    lr = cfg.lr if cfg.lr is not None else (1e-4 if hf else 2e-3)
    optimizers = _optimizers(model, cfg.weight_decay, lr)
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
    schedule = warmup_linear_decay(int(cfg.warmup * total_steps), total_steps)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers]
    amp = Amp(device, cfg.amp)
    swa_model = AveragedModel(model) if cfg.swa else None
    swa_start = cfg.swa_start_epoch()
    # HF encoders carry a pooler the loss never uses; buffers (lexical centroids) never change
    ddp = wrap_ddp(model, device, find_unused_parameters=hf, broadcast_buffers=False)

    logger = open_metric_logger(
        out / "log.jsonl",
        out,
        cfg,
        step_key="step",
        enabled=rank == 0,
        tags_of=validation_tags,
        config=asdict(cfg),
    )
    start_epoch, step, best, best_epoch, history = 0, 0, -1.0, -1, []
    if resumed is not None:
        if rank == 0:
            for note in ckpt.recover():
                print(f"[mhe-xmc] recovered after an interrupted run: {note}", flush=True)
        barrier()
        ck = resumed
        model.load_state_dict(ck["model"])
        for o, st in zip(optimizers, ck["optimizers"]):
            o.load_state_dict(st)
        for sch, st in zip(schedulers, ck["schedulers"]):
            sch.load_state_dict(st)
        amp.load_state_dict(ck["scaler"])
        if swa_model is not None and ck.get("swa") is not None:
            swa_model.load_state_dict(ck["swa"])
        start_epoch, step, best, best_epoch = ck["epoch"] + 1, ck["step"], ck["best"], ck["best_epoch"]
        history = [r for r in logger.read() if r["epoch"] <= ck["epoch"]]
        logger.truncate(lambda r: r["epoch"] <= ck["epoch"])  # rows after the commit are logged again
        set_rng_state(ck["rng"])
    pending_best: dict | None = None  # best weights since the last commit, written with the checkpoint

    meter = {"docs": 0, "t": time.time()}  # training throughput between two validations

    def validate(epoch: int, train_loss: float) -> None:
        """Validate the raw weights and, once it exists, the SWA average; keep the better one."""
        nonlocal best, best_epoch, pending_best
        docs_per_s = meter["docs"] / max(time.time() - meter["t"], 1e-9)
        cands = [("raw", model)]
        if swa_model is not None and int(swa_model.n_averaged) > 0:
            cands.append(("swa", swa_model.module))
        scored = []
        for name, m in cands:
            ids, _ = rank_documents(
                m, valid_col, len(ds.splits["valid"]), 5, cfg.batch_size * 2, device, amp.enabled
            )
            scored.append((name, m, compute_metrics(ids, ds.splits["valid"].labels, prop)))
        name, m, res = max(scored, key=lambda t: t[2][cfg.select_metric])  # raw wins ties
        rec = {
            "epoch": epoch,
            "step": step,
            "split": "valid",
            **res,
            "weights": name,
            "train_loss": round(train_loss, 6),
            "lr": schedulers[0].get_last_lr()[0],
            "swa": name == "swa",
            "elapsed_s": round(time.time() - t0, 2),
        }
        if len(scored) > 1:
            rec["other"] = {n: r for n, _, r in scored if n != name}
        history.append(rec)
        logger.log(rec, extra={"train/docs_per_s": docs_per_s})
        meter.update(docs=0, t=time.time())
        if res[cfg.select_metric] > best:
            best, best_epoch = res[cfg.select_metric], epoch
            state = {k: v.detach().clone() for k, v in m.state_dict().items()}
            pending_best = {"state_dict": state, "epoch": epoch, "step": step, "valid": res, "weights": name}

    def where() -> str:
        return f"epoch {epoch} step {step}"

    t0 = time.time()
    model.train()
    stop = False
    epoch = start_epoch
    with collective_timeout_guard(where):
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            bar = tqdm(
                loader,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=rank != 0 or not cfg.progress,
                leave=False,
            )
            run_loss, n_loss = 0.0, 0
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            for i, batch in enumerate(bar):
                batch = to_device(batch, device)
                boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader)
                sync = ddp.no_sync() if (world > 1 and not boundary) else nullcontext()
                with sync, amp.autocast():
                    loss = ddp(batch["inputs"], batch["labels"])
                with sync:
                    amp.backward(loss / cfg.grad_accum)
                run_loss += check_finite_loss(loss, epoch=epoch, step=step)
                n_loss += 1
                meter["docs"] += len(batch["index"]) * world
                if not boundary:
                    continue
                amp.step(optimizers)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                for sch in schedulers:
                    sch.step()
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
                last = {
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in optimizers],
                    "schedulers": [sch.state_dict() for sch in schedulers],
                    "scaler": amp.state_dict(),
                    "swa": swa_model.state_dict() if swa_model is not None else None,
                    "epoch": epoch,
                    "step": step,
                    "best": best,
                    "best_epoch": best_epoch,
                    "rng": rng_state(),
                }
                ckpt.commit(last, pending_best)  # checkpoint.pt (the commit point), then model.pt
            pending_best = None
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
    logger.close()
    if rank == 0:
        atomic_write_text(json.dumps(summary, indent=1) + "\n", out / "train_summary.json")
    return summary
