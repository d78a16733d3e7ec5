"""The anchors of the XMC benchmark, on the same TF-IDF features as the neural rows: omikuji in Parabel and
Bonsai modes, napkinXC's PLT, and the 30-nearest-neighbour vote alone (:class:`xmc.model.NeighbourScorer`
without a model). Used by :mod:`xmc.bench` and :mod:`xmc.tune`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

TREES = ("omikuji", "omikuji-bonsai", "napkinxc", "knn")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _write_xc(path: Path, x: sp.csr_matrix, y: sp.csr_matrix) -> None:
    """XC BoW format, as omikuji reads it."""
    with open(path, "w") as fh:
        fh.write(f"{x.shape[0]} {x.shape[1]} {y.shape[1]}\n")
        for i in range(x.shape[0]):
            labs = ",".join(map(str, y.indices[y.indptr[i] : y.indptr[i + 1]]))
            s, e = x.indptr[i], x.indptr[i + 1]
            feats = " ".join(f"{j}:{v:.6g}" for j, v in zip(x.indices[s:e], x.data[s:e]))
            fh.write(f"{labs} {feats}".rstrip() + "\n")  # omikuji rejects a trailing space


#: omikuji modes (its README): Parabel = library defaults (3 trees, balanced 2-means, depth 20); Bonsai =
#: regular (unbalanced) k-means with k = 100 and depth 3 (shallow, wide trees)
OMIKUJI_MODES = {
    "omikuji": {},
    "omikuji-bonsai": {"cluster_balanced": False, "cluster_k": 100, "max_depth": 3},
}


def run_tree(
    name: str, x_tr, y_tr, evals: dict[str, sp.csr_matrix], threads: int, work: Path, k: int = 5
) -> dict:
    """Train the anchor ``name`` (omikuji[-bonsai], napkinxc, knn) on (x_tr, y_tr) and rank every matrix of
    ``evals``: {"preds": {split: (n, k) ids}, "train_s", "predict_s" (per split), "model_bytes", "params"}."""
    preds, predict_s = {}, {}
    if name in OMIKUJI_MODES:
        import omikuji

        path = work / "omikuji_train.txt"
        _write_xc(path, x_tr, y_tr)
        hp = omikuji.Model.default_hyper_param()
        for key, val in OMIKUJI_MODES[name].items():
            setattr(hp, key, val)
        params = {a: getattr(hp, a) for a in dir(hp) if not a.startswith("_")}
        t0 = time.time()
        model = omikuji.Model.train_on_data(str(path), hp, n_threads=threads)
        train_s = time.time() - t0
        model.save(str(work / "omikuji_model"))
        nbytes = _dir_bytes(work / "omikuji_model")
        for split, x in evals.items():
            pred = np.full((x.shape[0], k), -1, dtype=np.int64)
            t1 = time.time()
            for i in range(x.shape[0]):
                s, e = x.indptr[i], x.indptr[i + 1]
                out = model.predict(list(zip(x.indices[s:e].tolist(), x.data[s:e].tolist())), top_k=k)
                pred[i, : len(out)] = [lab for lab, _ in out]
            preds[split], predict_s[split] = pred, time.time() - t1
    elif name == "napkinxc":
        from napkinxc.models import PLT

        model = PLT(str(work / "napkinxc_model"), threads=threads, seed=0)
        labels = [y_tr.indices[y_tr.indptr[i] : y_tr.indptr[i + 1]].tolist() for i in range(y_tr.shape[0])]
        params = {"model": "PLT", "seed": 0}
        t0 = time.time()
        model.fit(x_tr, labels)
        train_s = time.time() - t0
        nbytes = _dir_bytes(work / "napkinxc_model")
        for split, x in evals.items():
            t1 = time.time()
            out = model.predict(x, top_k=k)
            predict_s[split] = time.time() - t1
            pred = np.full((x.shape[0], k), -1, dtype=np.int64)
            for i, row in enumerate(out):
                pred[i, : len(row)] = row
            preds[split] = pred
    elif name == "knn":  # the neighbour vote alone: K = 30 nearest training docs, weights cos^2
        import torch

        from xmc.model import NeighbourScorer

        t0 = time.time()
        y = sp.csr_matrix(y_tr)
        nb = NeighbourScorer(x_tr.shape[1], x_tr.shape[0], y.shape[1], x_tr.nnz, y.nnz, k=30, power=2.0)
        nb.set_data(x_tr, y)
        train_s = time.time() - t0
        params = {"k": 30, "power": 2.0}
        nbytes = int(sum(b.numel() * b.element_size() for b in nb.buffers()))
        for split, x in evals.items():
            t1 = time.time()
            parts = []
            for s in range(0, x.shape[0], 512):
                v = torch.from_numpy(nb.votes(x[s : s + 512]).toarray())
                parts.append(v.topk(k, dim=1))
            vals = torch.cat([p.values for p in parts])
            ids = torch.cat([p.indices for p in parts])
            pred = torch.where(vals > 0, ids, -1).numpy()
            preds[split], predict_s[split] = pred, time.time() - t1
    else:
        raise ValueError(f"unknown anchor {name!r} ({', '.join(TREES)})")
    return {
        "preds": preds,
        "train_s": train_s,
        "predict_s": predict_s,
        "model_bytes": nbytes,
        "params": params,
    }
