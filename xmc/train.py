"""Training loop: AdamW (+ SparseAdam for the sparse TF-IDF bag) + warmup, gradient accumulation, AMP on
CUDA, late SWA with raw-vs-averaged selection on validation, kill-safe checkpoints with ``resume``, DDP under
torchrun. The run-folder policy, checkpoints, logs, AMP, schedule and guards are the core's
(:mod:`mhe_plugins.training`).

Fixed reference bugs: evaluation restores train mode; model selection uses the validation split only;
all labels are used; SWA lives in a separate ``AveragedModel`` so raw weights are never swapped;
gradient accumulation steps after every ``grad_accum`` micro-batches (not at step 0).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
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
    barrier,
    collective_timeout_guard,
    init_distributed_from_env,
    wrap_ddp,
)
from mhe_plugins.training.metric_log import open_metric_logger
from xmc.batching import IndexDataset, LengthBucketBatchSampler, to_device
from xmc.config import TrainConfig
from xmc.data import load_dataset
from xmc.evaluate import compute_metrics, rank_documents
from xmc.featurise import Featurised, check_resume_matches, write_static_files
from xmc.model import XMCModel


def _sparse_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that receive sparse gradients (the TF-IDF bag with ``sparse=True``)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.EmbeddingBag) and m.sparse]


def _param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, encoder_lr: float | None = None
) -> list[dict]:
    """Decay / no-decay groups; with ``encoder_lr`` the transformer's parameters get their own two groups."""
    groups: dict[tuple[bool, bool], list] = {}
    sparse = {id(p) for p in _sparse_params(model)}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in sparse:
            continue
        hf = encoder_lr is not None and (".hf." in f".{name}" or name.startswith("encoder.model."))
        no_decay = p.ndim < 2 or "norm" in name.lower()
        groups.setdefault((hf, no_decay), []).append(p)
    out = []
    for hf in (False, True):
        for no_decay in (False, True):
            if (hf, no_decay) in groups or (not hf):
                group = {
                    "params": groups.get((hf, no_decay), []),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
                if hf:
                    group["lr"] = encoder_lr
                out.append(group)
    return out


def _adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _optimizers(
    model: torch.nn.Module, weight_decay: float, lr: float, encoder_lr: float | None = None
) -> list[torch.optim.Optimizer]:
    """AdamW for the dense parameters (the transformer at ``encoder_lr`` when given); SparseAdam (lazy Adam:
    moments of untouched rows stay put, no weight decay) for sparse-gradient bags. Dense AdamW over a 40
    M-row bag costs more than the model's forward."""
    opts = [_adamw(_param_groups(model, weight_decay, lr, encoder_lr), lr)]
    sparse = _sparse_params(model)
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr))
    return opts


def validation_tags(rec: dict) -> dict[str, float]:
    """TensorBoard scalars of a ``log.jsonl`` validation row: ``train/loss``, ``train/lr``, ``valid/<metric>``
    of the weights kept (``valid/swa_selected`` = 1 when the SWA average won) and, once SWA validates too,
    ``valid_raw/<metric>`` and ``valid_swa/<metric>`` of both candidates."""
    metrics = {k: v for k, v in rec.items() if "@" in k}
    if rec.get("stage") == "ranker":
        return {f"ranker/{k}": v for k, v in metrics.items()}
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


def _ranker_row(report: dict, step: int) -> dict:
    """The log row of the learned ranker: its cross-fitted valid metrics (no ``epoch``: it is not one)."""
    return {
        "stage": "ranker",
        "step": step,
        "split": "valid",
        **report["ranker_crossfit"],
        "hand_weights": report["stage0"],
        "valid_docs": report["valid_docs"],
        "wall": report["wall"],
    }


def _fit_and_commit_ranker(
    cfg: TrainConfig, ds, feats: Featurised, mcfg: dict, ckpt: TrainState, train_col, valid_col, prop,
    device, step: int, logger, say,
) -> dict:  # fmt: skip
    """Fit the learned ranker on the selected weights (model.pt) and commit them with it: a new commit whose
    best state is model.pt plus the ranker (so a kill anywhere leaves the old model.pt or the new one)."""
    from xmc.ranker import RankerSettings, fit_ranker

    best_state, _ = ckpt.load_best("cpu")
    model = XMCModel(mcfg, ds.num_labels, feats.num_features)
    model.load_state_dict(best_state["state_dict"])
    model.to(device)
    settings = RankerSettings(
        shortlist=cfg.ranker_shortlist,
        negatives=cfg.ranker_negatives,
        epochs=cfg.ranker_epochs,
        train_docs=cfg.ranker_train_docs,
        batch_size=cfg.batch_size * 2,
        seed=cfg.seed,
    )
    x_tr = feats.features["train"]
    report = fit_ranker(
        model, train_col, valid_col, x_tr, ds.splits["train"].labels, ds.splits["valid"].labels, prop,
        settings, device, say=say,
    )  # fmt: skip
    last = ckpt.load_resume()  # the committed training state, unchanged
    last["ranker"] = report
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    best = {**{k: v for k, v in best_state.items() if not k.startswith("_")}, "state_dict": state}
    best["ranker"] = report
    ckpt.commit(last, best)
    logger.log(_ranker_row(report, step))
    return report


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
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    say(f"[mhe-xmc] encoder: {cfg.describe_encoder()}")
    if cfg.auto_resolved and cfg.encoder == "tfidf":
        say(f"[mhe-xmc] (--encoder auto = tfidf: {cfg.auto_reason}; docs/xmc.md)")
    feats = Featurised(cfg, ds, out, say=say)
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
        check_resume_matches(out, ds, feats, model)
    prepare_output_dir(
        out, resume=cfg.resume, overwrite=cfg.overwrite, run_files=RUN_FILES, main_process=rank == 0
    )
    if rank == 0 and resumed is None:
        write_static_files(cfg, ds, feats, model, out, prop)
    hf = cfg.encoder != "tfidf"
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.encoder == "hf" else 2e-3)
    encoder_lr = None
    if cfg.encoder == "hybrid" and not cfg.frozen():
        encoder_lr = cfg.encoder_lr if cfg.encoder_lr is not None else 1e-4
    elif cfg.encoder == "hf" and cfg.encoder_lr is not None:
        encoder_lr = cfg.encoder_lr
    optimizers = _optimizers(model, cfg.weight_decay, lr, encoder_lr)
    train_col = feats.collator(ds, "train", cfg.max_len)
    valid_col = feats.collator(ds, "valid", cfg.max_len)
    valid_order = None
    if cfg.tokens_in_training():  # length-bucketed batches: far less padding for the transformer
        sampler = LengthBucketBatchSampler(
            train_col.lengths(), cfg.batch_size, seed=cfg.seed, rank=rank, world=world
        )
        loader = DataLoader(
            IndexDataset(len(ds.splits["train"])), batch_sampler=sampler, collate_fn=train_col
        )
        valid_order = np.argsort(valid_col.lengths(), kind="stable")
    else:
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
    ranker_report = None

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
        ranker_report = ck.get("ranker")

        def kept(r: dict) -> bool:  # rows after the commit are logged again
            if "epoch" in r:
                return r["epoch"] <= ck["epoch"]
            return r.get("stage") == "ranker" and ranker_report is not None

        history = [r for r in logger.read() if "epoch" in r and r["epoch"] <= ck["epoch"]]
        logger.truncate(kept)
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
                m, valid_col, len(ds.splits["valid"]), 5, cfg.batch_size * 2, device, amp.enabled,
                order=valid_order,
            )  # fmt: skip
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
    train_s = round(time.time() - t0, 2)
    if cfg.use_ranker() and rank == 0 and ranker_report is None:
        ranker_report = _fit_and_commit_ranker(
            cfg, ds, feats, mcfg, ckpt, train_col, valid_col, prop, device, step, logger, say
        )
    elif (
        ranker_report is not None and rank == 0 and not any(r.get("stage") == "ranker" for r in logger.read())
    ):  # committed, but killed before its log row
        logger.log(_ranker_row(ranker_report, step))
    summary = {
        "best_epoch": best_epoch,
        f"best_valid_{cfg.select_metric}": best,
        "encoder": cfg.describe_encoder(),
        "embeddings_reused": feats.embed_reused,
        "train_s": train_s,
        "steps": step,
        "world_size": world,
        "classifier_parameters": model.head.classifier_parameters(),
        "num_labels": ds.num_labels,
        "history": history,
    }
    ranker_s = ranker_report["wall"]["fit_s"] if ranker_report is not None else 0.0
    if ranker_report is not None:
        summary["ranker"] = ranker_report
    # seconds (under "wall": timings differ between runs): the transformer embeddings as computed (also when
    # reused from the cache), the training loop with its validations, the ranker fit, and their sum = the
    # wall time to the reported model
    summary["wall"] = {
        "embed_s": round(feats.embed_s, 2),
        "train_s": train_s,
        "ranker_s": ranker_s,
        "total_s": round(feats.embed_s + train_s + ranker_s, 2),
    }
    logger.close()
    if rank == 0:
        atomic_write_text(json.dumps(summary, indent=1) + "\n", out / "train_summary.json")
    return summary
