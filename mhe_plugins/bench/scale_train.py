"""One run of the scale benchmark: train an encoder + head end to end on :class:`ScaleData`, evaluate it.

``python -m mhe_plugins.bench.scale_train --spec SPEC.json --out RESULT.json`` runs one spec (a fresh
process, so its peak RSS is its own); under ``torchrun --nproc_per_node W`` the MHS head is sharded over the
W ranks (gloo: the benchmark trains on CPU; the head calls the same collectives under nccl) and rank 0
writes the result. The orchestrator, run store and report are in :mod:`.scale`; the data and the oracle in
:mod:`.scale_data`; mid-run checkpoints in :mod:`.scale_ckpt`.

A spec is a flat dict (``scale.DEFAULTS`` plus ``method``, ``num_classes``, ``world``, ``memory_limit``).
Methods, every head built by :func:`mhe_plugins.heads.build_head`:

- ``mhp``: ``build_head("mhp", d, N, num_heads=H)``, H the fewest heads with every head <= 400 outputs;
- ``mhc``: ``build_head("mhc", d, N, num_heads=H, hidden_dim=mhc_hidden, beam=mhc_beam,
  sparse_grad=mhc_sparse)`` (with ``mhc_sparse``: row-sparse node tables and the lazy head optimiser);
- ``mhs``: ``build_head("mhs", d, N, head_sizes=(ceil(N / g), g), sparse_grad=True)``, g = ``mhs_group``
  (batch_union: the classes of the groups the batch hits; sharded over ranks when world > 1);
- ``pfc``: Partial FC as the face trainer builds it: ``head_sizes=(N, 1)``, ``sample_rate=pfc_rate``,
  no sampling correction, sparse rows;
- ``linear``: ``build_head("linear", d, N)``, the dense softmax;
- ``oracle``: no training, the Bayes-optimal top-k of the held-out set (:meth:`ScaleData.oracle_topk`).

A run that cannot allocate (``MemoryError``, torch's allocation ``RuntimeError``, under the address-space
limit ``memory_limit`` set on this process) ends with ``status: "oom"`` and the allocator's message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from ..codec import LabelCodec
from ..decode import merge_topk
from ..heads import build_head
from ..optim import LazyAdam, LazySGD, state_bytes
from .scale_ckpt import Checkpointer, Progress
from .scale_codes import LabelCodes, learn_codes
from .scale_data import ScaleData
from .worker import reset_peak_rss

__all__ = ["METHODS", "HEAD_OPTIMS", "run_spec", "mhp_heads_for", "estimate_bytes", "data_of", "peak_rss"]

METHODS = ("mhp", "mhc", "mhs", "pfc", "linear")
SHARDABLE = ("mhs", "pfc")
HEAD_OPTIMS = ("adam", "lazy_adam", "lazy_adam_bf16", "lazy_rowwise", "lazy_sgd", "sgd")
DATA_FIELDS = tuple(f for f in ScaleData.__dataclass_fields__ if f != "num_classes")
STATE_BYTES = {"adam": 8, "lazy_adam": 8, "lazy_adam_bf16": 4, "lazy_rowwise": 0, "lazy_sgd": 4, "sgd": 0}


def data_of(spec: dict) -> ScaleData:
    return ScaleData(int(spec["num_classes"]), **{f: spec[f] for f in DATA_FIELDS if f in spec})


def mhp_heads_for(n: int, max_size: int = 400) -> int:
    """The fewest heads whose balanced sizes are all <= ``max_size`` (at least 2): the MHP head's width
    sum C_h stays ~constant from 10^5 to 10^7 classes."""
    h = 2
    while max(LabelCodec.from_spec(n, num_heads=h).head_sizes) > max_size:
        h += 1
    return h


def _head_kwargs(spec: dict, process_group=None) -> dict:
    m, n = spec["method"], int(spec["num_classes"])
    if m == "mhp":
        return dict(num_heads=int(spec["mhp_heads"]) or mhp_heads_for(n))
    if m == "mhc":
        heads = int(spec["mhc_heads"]) or mhp_heads_for(n)
        return dict(
            num_heads=heads,
            hidden_dim=int(spec["mhc_hidden"]),
            beam=int(spec["mhc_beam"]),
            sparse_grad=bool(spec.get("mhc_sparse", False)),
        )
    if m == "mhs":
        g = int(spec["mhs_group"])
        return dict(
            head_sizes=(math.ceil(n / g), g),
            sparse_grad=True,
            process_group=process_group,
            group_shared=bool(spec.get("mhs_shared", False)),
        )
    if m == "pfc":
        return dict(
            head_sizes=(n, 1),
            sample_rate=float(spec["pfc_rate"]),
            sampling_correction=False,
            sparse_grad=True,
            process_group=process_group,
        )
    if m == "linear":
        return {}
    raise ValueError(f"unknown method {m!r}: one of {METHODS}")


def build_model(spec: dict, process_group=None) -> tuple[nn.Module, nn.Module]:
    """(encoder, head): a 2-layer MLP over the input features and the method's head (``build_head``)."""
    d_in, width, d = int(spec["dim"]), int(spec["hidden"]), int(spec["embed_dim"])
    encoder = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d))
    kind = "mhs" if spec["method"] == "pfc" else spec["method"]
    head = build_head(kind, d, int(spec["num_classes"]), **_head_kwargs(spec, process_group))
    return encoder, head


def build_optimizers(spec: dict, encoder: nn.Module, head: nn.Module) -> list[torch.optim.Optimizer]:
    """Adam for the encoder; ``head_optim`` for the head (lazy kinds update only sampled rows)."""
    lr, hlr, name = float(spec["lr"]), float(spec["head_lr"]), spec["head_optim"]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(encoder.parameters(), lr=lr)]
    params = list(head.parameters())
    if name == "adam":
        opts.append(torch.optim.Adam(params, lr=hlr))
    elif name in ("lazy_adam", "lazy_adam_bf16"):
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        opts.append(LazyAdam(params, lr=hlr, state_dtype=dtype))
    elif name == "lazy_rowwise":
        opts.append(LazyAdam(params, lr=hlr, betas=(0.0, 0.999), rowwise=True))
    elif name in ("lazy_sgd", "sgd"):
        opts.append(LazySGD(params, lr=hlr, momentum=0.9 if name == "lazy_sgd" else 0.0))
    else:
        raise ValueError(f"head_optim must be one of {HEAD_OPTIMS}, got {name!r}")
    return opts


def estimate_bytes(spec: dict) -> int:
    """A rough up-front estimate of one rank's peak (parameters, gradients, optimizer state, activations),
    recorded beside the measured peak."""
    m, n, d, b = spec["method"], int(spec["num_classes"]), int(spec["embed_dim"]), int(spec["batch"])
    world = int(spec.get("world", 1))
    state = STATE_BYTES[spec["head_optim"]]
    if m == "linear":
        p, dense_grad, act = n * (d + 1), True, 3 * b * n
    elif m == "mhp":
        sizes = LabelCodec.from_spec(n, num_heads=int(spec["mhp_heads"]) or mhp_heads_for(n)).head_sizes
        p, dense_grad, act = d * sum(sizes), True, 3 * b * sum(sizes)
    elif m == "mhc":
        hid = int(spec["mhc_hidden"])
        p, dense_grad, act = n * (hid + 1) * 1.1, not spec.get("mhc_sparse"), 4 * b * hid * 400
    elif m == "mhs":
        g = int(spec["mhs_group"])
        p, dense_grad, act = n * d / world, False, 3 * b * b * g
    else:  # pfc
        k = float(spec["pfc_rate"]) * n / world + b
        p, dense_grad, act = n * d / world, False, 3 * b * k + k * d
    grads = p if dense_grad else 2 * b * int(spec.get("mhs_group", 1)) * d
    return int(4 * (p + grads + act) + state * p + 6e8)


def peak_rss() -> int:
    """Peak resident set of this process in bytes (VmHWM, which :func:`reset_peak_rss` can reset)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("alloc" in text or "out of memory" in text)


def set_memory_limit(limit: int) -> bool:
    """Cap this process's data segment (every malloc/mmap) at ``limit`` bytes: past it an allocation fails
    with the allocator's error instead of waking the kernel's OOM killer on a shared machine."""
    if limit <= 0:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
        return True
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------- training
def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then linear decay to 0."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return max(0.0, (1.0 - progress) / (1.0 - warmup))


def _sync_stop(stop: bool, world: int) -> bool:
    if world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def train(
    spec: dict,
    encoder,
    head,
    opts,
    data: ScaleData,
    rank: int,
    world: int,
    say,
    codes: LabelCodes | None = None,
) -> dict:
    """Train for ``epochs`` (or until ``time_budget`` s), continuing from the run's checkpoint if any; with
    learned ``codes`` the head trains on label codes (learned first unless the checkpoint holds them)."""
    from tqdm import tqdm

    from ..training import JsonlLogger

    batch, epochs = int(spec["batch"]), float(spec["epochs"])
    per_epoch = data.steps_per_epoch(batch)
    total = max(1, int(round(epochs * per_epoch)))
    budget = float(spec.get("time_budget") or 0.0)
    log_every = max(1, int(spec.get("log_every") or 200))
    log = JsonlLogger(spec.get("log_path"), enabled=rank == 0 and bool(spec.get("log_path")))
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    ckpt = Checkpointer(spec.get("work_dir"), float(spec.get("checkpoint_every") or 0), rank, world)
    modules = {"encoder": encoder, "head": head, **({"codes": codes} if codes is not None else {})}
    pg = ckpt.load(modules, opts) or Progress()
    step0 = pg.step
    if codes is not None and not codes.learned:
        learn_codes(codes, data, head.codec.head_sizes, int(spec["seed"]), rank, world, say)
    if pg.resumes:
        reset_peak_rss()  # the loaded file's pages are not the run's working set; pg keeps the old peak
        log.truncate(lambda row: row.get("step", 0) <= pg.step)
        if rank == 0:
            say(f"resumed at step {pg.step:,} of {total:,} (resume {pg.resumes})")
    bar = tqdm(total=total, initial=pg.step, disable=rank != 0 or not spec.get("progress", True), unit="step",
               mininterval=2.0)  # fmt: skip
    bar.set_description(f"{spec['method']} N={data.num_classes:,}")
    cpu0, start = cpu_seconds() - pg.cpu_s, time.perf_counter() - pg.elapsed_s
    saved_at = time.perf_counter()
    encoder.train()
    head.train()
    stop = pg.budget_hit
    for epoch in range(pg.step // per_epoch, math.ceil(epochs)):
        ep_start, from_start = time.perf_counter(), pg.step % per_epoch == 0
        batches = data.train_batches(epoch, batch, start_step=pg.step % per_epoch, rank=rank, world=world)
        while pg.step < total and not stop:
            t0 = time.perf_counter()
            item = next(batches, None)
            t1 = time.perf_counter()
            pg.t_data += t1 - t0
            if item is None:
                break
            progress = pg.step / total
            if budget:
                progress = max(progress, (t1 - start) / budget)
                stop = pg.budget_hit = _sync_stop(progress >= 1.0, world)
                if stop:
                    break
            f = _lr_factor(progress, float(spec["warmup"]))
            for o, lrs in zip(opts, base):
                for g, lr in zip(o.param_groups, lrs):
                    g["lr"] = lr * f
            x, y = item
            loss = head(encoder(x), y if codes is None else codes.to_codes(y)).loss
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in encoder.parameters():
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            for o in opts:
                o.step()
            pg.t_model += time.perf_counter() - t1
            pg.step += 1
            pg.seen += batch
            pg.loss_sum, pg.loss_n = pg.loss_sum + float(loss.detach()), pg.loss_n + 1
            bar.update(1)
            if pg.step % log_every == 0 or pg.step == total:
                row = {
                    "step": pg.step,
                    "epoch": pg.step / per_epoch,
                    "loss": pg.loss_sum / pg.loss_n,
                    "lr_factor": f,
                    "examples_per_s": pg.seen / max(pg.t_model, 1e-9),
                    "elapsed_s": time.perf_counter() - start,
                }
                log.log(row)
                pg.last_loss = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.3f}", ex_s=f"{row['examples_per_s']:,.0f}")
                pg.loss_sum, pg.loss_n = 0.0, 0
            if pg.step < total and ckpt.due(time.perf_counter() - saved_at):
                pg.elapsed_s, pg.cpu_s = time.perf_counter() - start, cpu_seconds() - cpu0
                pg.peak_rss_bytes = max(pg.peak_rss_bytes, peak_rss())
                ckpt.save(pg, modules, opts)
                saved_at = time.perf_counter()
        if pg.step and pg.step % per_epoch == 0 and not stop and from_start:
            pg.epoch_s.append(time.perf_counter() - ep_start)  # only epochs timed whole in one session
        if stop or pg.step >= total:
            break
    bar.close()
    wall = time.perf_counter() - start
    if ckpt.path is not None and pg.step > step0:
        # the trained state before evaluation: a failed evaluation (memory) is retried without training again
        pg.elapsed_s, pg.cpu_s = wall, cpu_seconds() - cpu0
        pg.peak_rss_bytes = max(pg.peak_rss_bytes, peak_rss())
        ckpt.save(pg, modules, opts)
    return {
        "steps": pg.step,
        "examples": pg.seen,
        "epochs_done": pg.step / per_epoch,
        "budget_exhausted": pg.budget_hit,
        "train_s": wall,
        "train_model_s": pg.t_model,
        "train_data_s": pg.t_data,
        "train_cpu_s": cpu_seconds() - cpu0,
        "train_examples_per_s": pg.seen / max(pg.t_model, 1e-9),
        "train_examples_per_s_wall": pg.seen / max(wall, 1e-9),
        "epoch_s": (sum(pg.epoch_s) / len(pg.epoch_s)) if pg.epoch_s else per_epoch * wall / max(pg.step, 1),
        "epoch_s_measured": bool(pg.epoch_s),
        "final_loss": pg.loss_sum / pg.loss_n if pg.loss_n else pg.last_loss,
        "resumes": pg.resumes,
        "peak_rss_before_resume_bytes": pg.peak_rss_bytes,
        "codes_s": float(codes.seconds) if codes is not None else 0.0,
    }


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _sharded_topk(head, e: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k ids over a class-sharded MHS: each rank ranks its own rows, the k-lists are merged."""
    v, i = head.local_topk(e, k)  # k <= the classes of every shard (k = 5)
    world = dist.get_world_size()
    vs, ids = [torch.empty_like(v) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(vs, v.contiguous())
    dist.all_gather(ids, i.contiguous())
    return merge_topk(None, (torch.cat(vs, 1), torch.cat(ids, 1)), k)[1]


@torch.no_grad()
def evaluate(spec: dict, encoder, head, data: ScaleData, world: int, codes: LabelCodes | None = None) -> dict:
    k, b = int(spec["topk"]), int(spec["eval_batch"])
    encoder.eval()
    head.eval()
    top1 = top5 = n = 0
    t_model, cpu0, start = 0.0, cpu_seconds(), time.perf_counter()
    for x, c in data.eval_batches(b):
        t0 = time.perf_counter()
        e = encoder(x)
        ids = _sharded_topk(head, e, k) if world > 1 else head.topk(e, k)[1]
        if codes is not None:
            ids = codes.to_labels(ids)
        t_model += time.perf_counter() - t0
        top1 += int((ids[:, 0] == c).sum())
        top5 += int((ids == c[:, None]).any(1).sum())
        n += len(c)
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "eval_examples": n,
        "eval_s": time.perf_counter() - start,
        "eval_cpu_s": cpu_seconds() - cpu0,
        "topk_queries_per_s": n / max(t_model, 1e-9),
        "topk_exact": spec["method"] != "mhc",
    }


def oracle(spec: dict, data: ScaleData) -> dict:
    from tqdm import tqdm

    k = int(spec["topk"])
    x, c = zip(*data.eval_batches(data.eval_examples))
    x, c = torch.cat(x), torch.cat(c)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    with tqdm(
        total=data.num_classes, unit="class", unit_scale=True, desc=f"oracle N={data.num_classes:,}"
    ) as bar:
        _, ids = data.oracle_topk(x, k, progress=bar.update)
    return {
        "top1": 100.0 * float((ids[:, 0] == c).float().mean()),
        "top5": 100.0 * float((ids == c[:, None]).any(1).float().mean()),
        "eval_examples": len(c),
        "eval_s": time.perf_counter() - start,
        "eval_cpu_s": cpu_seconds() - cpu0,
    }


# ---------------------------------------------------------------------------- one run
def _memory(encoder, head, opts) -> dict:
    hp = list(head.parameters())
    return {
        "head_param_bytes": sum(p.numel() * p.element_size() for p in hp),
        "head_state_bytes": state_bytes(opts[-1], hp),
        "encoder_param_bytes": sum(p.numel() * p.element_size() for p in encoder.parameters()),
        "head_params": sum(p.numel() for p in hp),
    }


def run_spec(spec: dict, say=print) -> dict:
    """Run one spec in this process (under torchrun: this rank's part); the record of rank 0."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if spec["method"] == "oracle":
        world = 1  # computed by one process (rank 0 under torchrun)
    if int(spec.get("world", 1)) != world:
        raise ValueError(f"spec is for {spec.get('world', 1)} ranks, running on {world}")
    if world > 1 and spec["method"] not in SHARDABLE + ("oracle",):
        raise ValueError(f"only {SHARDABLE} shard over ranks, not {spec['method']!r}")
    if int(spec.get("threads") or 0) > 0:
        torch.set_num_threads(int(spec["threads"]))
    reset = reset_peak_rss()
    rec: dict = {
        "status": "ok",
        "estimated_bytes": estimate_bytes(spec) if spec["method"] != "oracle" else None,
    }
    start = time.perf_counter()
    try:
        data = data_of(spec)
        if spec["method"] == "oracle":
            rec.update(oracle(spec, data))
        else:
            torch.manual_seed(int(spec["seed"]))
            pg = dist.group.WORLD if world > 1 else None
            encoder, head = build_model(spec, pg)
            opts = build_optimizers(spec, encoder, head)
            codes = LabelCodes(data.num_classes) if spec.get("codes", "id") == "pifa" else None
            rec.update(train(spec, encoder, head, opts, data, rank, world, say, codes))
            rec.update(_memory(encoder, head, opts))
            rec.update(evaluate(spec, encoder, head, data, world, codes))
            rec["head_sizes"] = list(head.codec.head_sizes)
    except (MemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        rec.update(status="oom", error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
    rec["wall_s"] = time.perf_counter() - start
    rec["peak_rss_bytes"] = max(peak_rss(), int(rec.get("peak_rss_before_resume_bytes") or 0))
    rec["peak_rss_reset"] = reset
    if world > 1:
        per_rank = [None] * world
        mine = {k: rec.get(k) for k in ("peak_rss_bytes", "head_param_bytes", "head_state_bytes", "status")}
        dist.all_gather_object(per_rank, mine)
        rec["per_rank"] = per_rank
        rec["peak_rss_bytes"] = max(r["peak_rss_bytes"] or 0 for r in per_rank)
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON file of the run's spec")
    ap.add_argument("--out", required=True, help="where rank 0 writes the run's record (JSON)")
    a = ap.parse_args(argv)
    with open(a.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    limit = int(spec.get("memory_limit") or 0) // max(1, world)
    limited = set_memory_limit(limit)
    if world > 1:
        from ..training.dist import init_distributed_from_env

        init_distributed_from_env(backend="gloo")  # CPU tensors: gloo even where CUDA exists
    try:
        rec = run_spec(spec)
    except Exception as exc:  # a crash is a record too, with its traceback's last lines
        rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
        rec["traceback"] = traceback.format_exc()[-2000:]
        rec["peak_rss_bytes"] = peak_rss()
    rec["memory_limit_bytes"] = limit if limited else 0
    if int(os.environ.get("RANK", "0")) == 0:
        from ..training import atomic_write_json

        atomic_write_json(rec, a.out)
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
