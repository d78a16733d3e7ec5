"""``python -m mhe_plugins.bench scale``: train and serve 10^5 -> 10^7 classes end to end, every method.

For every N of ``--num-classes``: the oracle (:mod:`.scale_data`), then every method of ``--methods``
(:mod:`.scale_train`), each in a fresh worker process (its peak RSS is its own, its allocations capped at
``--memory-limit``), and for the N of ``--sharded`` the shardable methods again over ``--nproc-per-node``
ranks (torchrun, gloo on CPU). A method may carry overrides, ``mhs@head_optim=lazy_sgd,mhs_group=16``:
one more line of the report, so an option of the core (optimizer state, group size, ...) is measured, not
assumed.

Resumable: a finished run's record is one JSON file in the run store (``OUT/runs/scale/<name>.json``, the
name carries a hash of every setting that shapes the run); a rerun with the same settings skips it, and the
report (``OUT/scale.{json,md,png}``, PARTIAL while cells are missing) is rewritten after every run. A run
that cannot allocate is stored with ``status: "oom"`` and the allocator's message (it is retried only under
a larger ``--memory-limit``); a crash is stored nowhere (the next rerun tries again). A run also writes a
mid-run checkpoint every ``--checkpoint-every`` seconds (:mod:`.scale_ckpt`): a killed run continues from
it. Under ``torchrun`` (``torchrun --nproc_per_node 2 -m mhe_plugins.bench scale ...``) the runs execute in
the launched ranks themselves: that is how a run spans several machines (``docs/scale.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .env import environment, mem_available_bytes, thread_env
from .scale_ckpt import checkpoint_files
from .scale_codes import CODES
from .scale_train import DATA_FIELDS, HEAD_OPTIMS, METHODS, SHARDABLE
from .store import RunStore

__all__ = ["DEFAULTS", "parse_method", "plan", "run_benchmark", "run_name", "run_key"]

#: every setting of a run but the method, N and world size; the CLI exposes each as ``--<name>``
DEFAULTS = {
    # data (ScaleData), calibrated in docs/scale.md
    "seed": 0,
    "dim": 64,
    "zipf": 0.75,
    "leaf_group": 8,
    "mid_group": 32,
    "leaf_dims": 8,
    "w_top": 0.5,
    "w_mid": 0.3,
    "w_leaf": 0.2,
    "noise": 0.5,
    "noise_rest": 0.3,
    "label_noise": 0.05,
    "train_per_class": 10.0,
    "eval_examples": 10000,
    "tree_aligned": False,
    # model
    "hidden": 256,
    "embed_dim": 64,
    "mhp_heads": 0,  # 0: the fewest heads with every head <= 400 outputs
    "mhc_heads": 0,
    "mhc_hidden": 64,
    "mhc_beam": 8,
    "mhc_sparse": False,  # MHC: row-sparse node-table gradients + a lazy head optimiser (lazy_adam)
    "mhs_group": 8,
    "mhs_shared": False,  # MHS: a shared row per group added to its classes' rows (group_shared)
    "codes": "id",  # MHE heads: "id" (label ids as they come) or "pifa" (learned: bench/scale_codes.py)
    "pfc_rate": 0.1,
    # training
    "epochs": 2.0,
    "batch": 512,
    "lr": 2e-3,
    "head_lr": 0.0,  # 0: HEAD_LR for every head (calibrated: docs/scale.md)
    "head_optim": "auto",  # auto: adam for dense heads, SPARSE_OPTIM for mhs/pfc, lazy_adam for mhc_sparse
    "warmup": 0.02,
    "time_budget": 0.0,  # seconds of training (0: none); the LR schedule follows time then
    # evaluation
    "topk": 5,
    "eval_batch": 1024,
    "threads": 0,
}
SPARSE_OPTIM = "lazy_adam_bf16"
#: the head's learning rate unless a run sets one: 15x the encoder's, for every head (at N = 2e4 it lifted the
#: dense layer from 45.9 to 64.2 top-1 and MHC from 18.9 to 25.0: scale_calibration.md)
HEAD_LR = 3e-2
#: settings added after runs were stored: left out of the key at the value that reproduces the old behaviour,
#: so those runs keep their names
KEY_SINCE = {"codes": "id", "mhs_shared": False, "mhc_sparse": False}
#: not part of a run's key (they do not change what is computed)
NOT_KEY = ("memory_limit", "log_path", "progress", "log_every", "work_dir", "checkpoint_every")


def parse_method(text: str) -> tuple[str, dict]:
    """``"mhs@head_optim=lazy_sgd,mhs_group=16"`` -> ``("mhs", {"head_optim": "lazy_sgd", "mhs_group": 16})``;
    values are typed like their default."""
    base, _, rest = text.partition("@")
    if base not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (with optional @key=value,...), got {text!r}")
    over = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in DEFAULTS:
            raise ValueError(
                f"bad override {item!r} in {text!r}: use key=value with key in {sorted(DEFAULTS)}"
            )
        kind = type(DEFAULTS[key])
        over[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return base, over


def resolve(spec: dict) -> dict:
    """Fill the ``auto`` settings of a spec (so the run key names them)."""
    if spec["method"] != "mhc":
        spec["mhc_sparse"] = False
    if spec["head_optim"] == "auto":
        if spec["method"] in SHARDABLE:
            spec["head_optim"] = SPARSE_OPTIM
        else:  # MHC's sparse rows: fp32 state (bf16's stochastic rounding was 40 % of its step at 10^6)
            spec["head_optim"] = "lazy_adam" if spec["mhc_sparse"] else "adam"
    if spec["head_optim"] not in HEAD_OPTIMS:
        raise ValueError(f"head_optim must be auto or one of {HEAD_OPTIMS}, got {spec['head_optim']!r}")
    if not spec["head_lr"]:
        spec["head_lr"] = HEAD_LR
    if spec["codes"] not in CODES:
        raise ValueError(f"codes must be one of {CODES}, got {spec['codes']!r}")
    if spec["method"] not in ("mhp", "mhc", "mhs"):
        spec["codes"] = "id"  # one row per class (pfc, linear): nothing to code
    if spec["method"] != "mhs":
        spec["mhs_shared"] = False
    if spec["method"] == "mhc" and spec["eval_batch"] > 256:
        spec["eval_batch"] = 256  # the beam scores (B, beam, C, hidden) at once
    return spec


def run_key(spec: dict) -> dict:
    return {k: spec[k] for k in sorted(spec) if k not in NOT_KEY and KEY_SINCE.get(k, object()) != spec[k]}


def run_name(label: str, spec: dict) -> str:
    digest = hashlib.sha1(json.dumps(run_key(spec), sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "._=-" else "+" for ch in label)
    return f"{safe}-N{spec['num_classes']}-w{spec['world']}-{digest}"


#: the data settings that shape the held-out task, hence the oracle (not the training set's size or noise)
ORACLE_FIELDS = tuple(f for f in DATA_FIELDS if f not in ("train_per_class", "label_noise"))


def oracle_key(spec: dict) -> tuple:
    """What makes two runs share an oracle: N and the held-out task's settings."""
    return (int(spec["num_classes"]), *(spec[f] for f in ORACLE_FIELDS))


def parse_budgets(items: list[str] | None) -> dict[int, float]:
    """``["10000000=4500"]`` -> ``{10**7: 4500.0}`` (``--time-budget-at``), with an error naming a bad item."""
    out = {}
    for item in items or []:
        n, eq, seconds = item.partition("=")
        try:
            out[int(float(n))] = float(seconds)
            ok = eq and out[int(float(n))] > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"bad --time-budget-at {item!r}: use N=SECONDS with SECONDS > 0, e.g. 10000000=4500"
            )
    return out


def capped(own: float, cap: float | None) -> float:
    """The smaller of two training-time caps, where 0 / None means no cap."""
    caps = [float(c) for c in (own, cap) if c]
    return min(caps) if caps else 0.0


def plan(
    settings: dict,
    sizes: list[int],
    methods: list[str],
    sharded: list[int],
    nproc: int,
    budget_at: dict[int, float] | None = None,
) -> list[dict]:
    """The runs, in order: per N the oracle, then every method (world 1), then the sharded runs. A method
    whose overrides change the held-out task (``mhp@tree_aligned=true``) gets its own oracle cell. At an N of
    ``budget_at`` every method trains at most that many seconds (its own smaller ``time_budget`` wins)."""
    cells = []
    for n in sizes:
        todo = [("oracle", "oracle", {}, 1)] + [(m, *parse_method(m), 1) for m in methods]
        if n in sharded and nproc > 1:
            todo += [(m, *parse_method(m), nproc) for m in methods if parse_method(m)[0] in SHARDABLE]
        oracles = {}
        for label, method, over, world in todo:
            spec = {**settings, **over, "method": method, "num_classes": int(n), "world": world}
            task = {k: v for k, v in over.items() if k in ORACLE_FIELDS}
            if method != "oracle" and oracle_key(spec) not in oracles:
                extra = "oracle@" + ",".join(f"{k}={v}" for k, v in task.items())
                oracles[oracle_key(spec)] = True
                cells.append(_oracle_cell(extra, {**settings, **task}, n))
            if method == "oracle":
                oracles[oracle_key(spec)] = True
                cells.append(_oracle_cell(label, settings, n))
                continue
            spec["time_budget"] = capped(spec["time_budget"], (budget_at or {}).get(int(n)))
            resolve(spec)
            cells.append({"label": label, "spec": spec, "name": run_name(label, spec)})
    return cells


def _oracle_cell(label: str, settings: dict, n: int) -> dict:
    """Only the held-out data and k shape the oracle (its key leaves out everything else)."""
    spec = {"method": "oracle", "num_classes": int(n), "world": 1, "topk": settings["topk"]}
    spec.update({f: settings[f] for f in ORACLE_FIELDS})
    return {"label": label, "spec": spec, "name": run_name(label, spec)}


def reference_first(cells: list[dict], label: str) -> list[dict]:
    """The cells in plan order, except that at each (N, world) the ``--equal-time`` reference runs right
    after the oracles: the others need its time."""

    def rank(i_cell: tuple[int, dict]) -> tuple:
        i, c = i_cell
        s = c["spec"]
        group = next(j for j, d in enumerate(cells) if d["spec"]["num_classes"] == s["num_classes"])
        return (group, s["world"], 0 if s["method"] == "oracle" else 1 if c["label"] == label else 2, i)

    return [c for _, c in sorted(enumerate(cells), key=rank)]


def equal_time_budget(ref: dict, own: float) -> float:
    """The reference run's wall time, learning its label codes included (what a user waits for), capped
    by a method's own ``time_budget`` when it sets a smaller one (``mhc@time_budget=3600``)."""
    wall = round(float(ref["train_s"]) + float(ref.get("codes_s") or 0.0), 1)
    return min(wall, float(own)) if own else wall


def timed_like_reference(cell: dict, cells: list[dict], store: RunStore, label: str | None) -> bool:
    """Under ``--equal-time LABEL``: give ``cell`` the reference run's time at its (N, world) and rename it
    (its key carries the budget); False while that run is not stored. Reads the store, never writes."""
    spec = cell["spec"]
    if not label or spec["method"] == "oracle" or cell["label"] == label:
        return True
    ref = next((r for r in cells if r["label"] == label and r["spec"]["num_classes"] == spec["num_classes"]
                and r["spec"]["world"] == spec["world"]), None)  # fmt: skip
    rec = store.find(ref["name"], run_key(ref["spec"])) if ref else None
    if rec is None or rec.get("status") != "ok":
        return False
    spec["time_budget"] = equal_time_budget(rec, spec["time_budget"])
    cell["name"] = run_name(cell["label"], spec)
    return True


def _done(limit: int) -> Callable[[dict], bool]:
    def done(rec: dict) -> bool:
        if rec.get("status") == "ok":
            return True
        return rec.get("status") == "oom" and int(rec.get("memory_limit_total_bytes") or 0) >= limit

    return done


def _launch(spec: dict, work: Path, threads: int, say) -> dict:
    """Run one spec in a fresh worker process (torchrun for world > 1); its record."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    out.unlink(missing_ok=True)
    mod = ["-m", "mhe_plugins.bench.scale_train", "--spec", str(spec_path), "--out", str(out)]
    if spec["world"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(spec["world"]), *mod]
    else:
        cmd = [sys.executable, *mod]
    env = thread_env(threads) if threads else dict(os.environ)
    proc = subprocess.run(cmd, env=env)
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    code = proc.returncode
    if code in (-9, 137):  # the kernel's OOM killer or a user: not a measured allocation failure
        return {"status": "killed", "error": f"worker killed by SIGKILL (exit {code}); not stored, a rerun "
                "continues from its last checkpoint"}  # fmt: skip
    return {"status": "error", "error": f"worker exited with code {code} and wrote no record"}


def run_benchmark(args, say=print) -> dict:
    """Run (or reuse) every planned cell, rewrite the report after each; the report's result dict."""
    from .scale_report import write_scale_report

    settings = {k: getattr(args, k) for k in DEFAULTS}
    in_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if in_ranks:  # launched by torchrun: the shardable methods over these ranks at every N
        args.sharded, args.nproc_per_node = list(args.num_classes), int(os.environ["WORLD_SIZE"])
    budget_at = parse_budgets(getattr(args, "time_budget_at", None))
    cells = plan(settings, args.num_classes, args.methods, args.sharded, args.nproc_per_node, budget_at)
    if in_ranks:  # the ranks run (and report) only what they can: the oracle and the sharded cells
        cells = [c for c in cells if c["spec"]["world"] > 1 or c["spec"]["method"] == "oracle"]
        alone = sorted({m for m in args.methods if parse_method(m)[0] not in SHARDABLE})
        if alone and int(os.environ.get("RANK", "0")) == 0:
            say(f"under torchrun only {SHARDABLE} run (sharded); not here: {', '.join(alone)}")
    out_dir = Path(args.out_dir)
    store = RunStore(out_dir / "runs" / "scale", say=say)
    limit = int(args.memory_limit * 2**30) if args.memory_limit else int(0.8 * mem_available_bytes())
    env = {**environment(args.threads), "memory_limit_bytes": limit}
    meta = {"settings": settings, "sizes": args.num_classes, "methods": args.methods, "sharded": args.sharded,
            "nproc_per_node": args.nproc_per_node, "equal_time": args.equal_time, "environment": env,
            **({"time_budget_at": {str(n): s for n, s in budget_at.items()}} if budget_at else {})}  # fmt: skip

    def report() -> dict:
        return write_scale_report(out_dir / args.report, cells, store, meta)

    if in_ranks and args.equal_time:
        raise SystemExit("--equal-time needs the run store of one machine: not under torchrun")
    if args.equal_time:
        cells = reference_first(cells, args.equal_time)
    if getattr(args, "report_only", False):
        for c in cells:
            timed_like_reference(c, cells, store, args.equal_time)  # the names the runs were stored under
        return report()
    if args.dry_run:
        from .scale_train import estimate_bytes

        listed = {}
        for c in cells:  # read-only: lists, writes nothing (not even the report)
            if not timed_like_reference(c, cells, store, args.equal_time):
                say(f"{c['name']:<60} waits for the {args.equal_time} run (--equal-time)")
                listed[c["name"]] = {"estimate_gib": None, "done": False}
                continue
            est = estimate_bytes(c["spec"]) / 2**30 if c["spec"]["method"] != "oracle" else 0.0
            done = store.find(c["name"], run_key(c["spec"]))
            listed[c["name"]] = {"estimate_gib": round(est, 2), "done": bool(done)}
            say(f"{c['name']:<60} est {est:6.1f} GiB  {'done' if done else 'to run'}")
        return {"dry_run": listed}
    for c in cells:
        spec = c["spec"]
        if not timed_like_reference(c, cells, store, args.equal_time):
            say(
                f"{c['name']}: waits for the {args.equal_time} run at N={spec['num_classes']:,} (--equal-time)"
            )
            continue
        work = Path(args.work_dir) / c["name"]
        full = {
            **spec,
            "memory_limit": limit,
            "log_path": str(work / "log.jsonl"),
            "log_every": args.log_every,
            "work_dir": str(work),
            "checkpoint_every": args.checkpoint_every,
        }
        if in_ranks:
            _cell_in_ranks(c, full, store, args.force, report, say)
            continue

        def run(full=full, work=work, name=c["name"]) -> dict:
            say(f"== {name}")
            rec = _launch(full, work, args.threads, say)
            rec.update(
                key=run_key(full), memory_limit_total_bytes=limit, environment=environment(args.threads)
            )
            if rec["status"] not in ("ok", "oom"):
                say(f"{name}: {rec['status']}: {rec.get('error')}\n{rec.get('traceback', '')}")
            return rec

        rec = store.run_or_reuse(
            c["name"], run, run_key(spec), done=_done(limit), force=args.force, on_stored=report
        )
        if rec is not None and rec.get("status") == "ok":  # its checkpoints have served; after an oom they
            for f in checkpoint_files(work):  # stay: a rerun (more memory, --force) continues from them
                f.unlink()
    if in_ranks:
        from ..training.dist import cleanup_distributed

        cleanup_distributed()  # a gloo group left alive at exit can abort a rank (std::terminate)
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
    return report()


def _cell_in_ranks(cell: dict, spec: dict, store: RunStore, force: bool, report, say) -> None:
    """Under torchrun: rank 0 decides from its store whether the cell runs, every rank runs it in this
    process (the launched ranks are the workers, on one machine or several), rank 0 stores the record."""
    import torch.distributed as dist

    from ..training.dist import init_distributed_from_env
    from .scale_train import run_spec

    init_distributed_from_env(backend="gloo")  # the benchmark trains on CPU (nccl needs CUDA tensors)
    rank, key = dist.get_rank(), run_key(spec)
    spec = {**spec, "log_path": spec["log_path"] if rank == 0 else None, "memory_limit": 0}
    todo = [False]
    if rank == 0:
        found = store.find(cell["name"], key)
        todo[0] = force or found is None or not _done(0)(found)
    dist.broadcast_object_list(todo, src=0)
    if not todo[0]:
        return
    oracle = spec["method"] == "oracle"  # needs no ranks: rank 0 computes it, the others wait
    if rank == 0:
        say(f"== {cell['name']}" + ("" if oracle else f" (in {dist.get_world_size()} ranks)"))
    rec = run_spec(spec) if rank == 0 or not oracle else {}
    dist.barrier()
    stored = [False]
    if rank == 0:
        rec.update(key=key, memory_limit_total_bytes=0, memory_limit_bytes=0, environment=environment())
        if rec["status"] in ("ok", "oom"):
            store.save(cell["name"], rec)
            report()
            stored[0] = rec["status"] == "ok"  # after an oom the checkpoints stay (see run_benchmark)
        else:
            say(f"{cell['name']}: {rec['status']}: {rec.get('error')}")
    dist.broadcast_object_list(stored, src=0)
    if stored[0] and spec.get("work_dir"):  # every rank removes its own mid-run checkpoint
        for f in checkpoint_files(spec["work_dir"]):
            if f.name == f"ckpt-rank{rank}.pt":
                f.unlink()
