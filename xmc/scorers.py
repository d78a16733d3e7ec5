"""Sparse label scorers of the XMC model, all on the TF-IDF: PECOS-style label/group centroids and the lexical
cosine term (:class:`LexicalScorer`), the nearest-neighbour label vote (:class:`NeighbourScorer`), and the
CSR-in-buffers helpers that keep their sparse data in ``model.pt`` (tensors only: ``weights_only`` loads)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.preprocessing import normalize
from torch import nn


def label_centroids(features: sp.csr_matrix, labels: sp.csr_matrix) -> sp.csr_matrix:
    """(N, F) L2-normalised mean TF-IDF of each label's training documents (PECOS's PIFA); empty rows for
    labels without training documents."""
    return normalize((labels.T.tocsr().astype(np.float32) @ features).tocsr(), norm="l2", axis=1).tocsr()


def group_centroids(
    features: sp.csr_matrix, labels: sp.csr_matrix, group_of: np.ndarray, g: int
) -> sp.csr_matrix:
    """(G, F) L2-normalised mean TF-IDF of the documents having a label in each group."""
    member = sp.csr_matrix(
        (np.ones(len(group_of), np.float32), (np.arange(len(group_of)), group_of)), shape=(len(group_of), g)
    )
    hits = (labels @ member).tocsr()
    hits.data[:] = 1.0
    return label_centroids(features, hits)


def _csr_buffers(module: nn.Module, prefix: str, rows: int, nnz: int, values: bool = True) -> None:
    """Register ``{prefix}crow/col[/val]`` buffers holding a CSR matrix, so ``model.pt`` carries it."""
    module.register_buffer(f"{prefix}crow", torch.zeros(rows + 1, dtype=torch.int64))
    module.register_buffer(f"{prefix}col", torch.zeros(nnz, dtype=torch.int64))
    if values:
        module.register_buffer(f"{prefix}val", torch.zeros(nnz, dtype=torch.float32))


def _set_csr_buffers(module: nn.Module, prefix: str, m: sp.csr_matrix, values: bool = True) -> None:
    getattr(module, f"{prefix}crow").copy_(torch.from_numpy(m.indptr.astype(np.int64)))
    getattr(module, f"{prefix}col").copy_(torch.from_numpy(m.indices.astype(np.int64)))
    if values:
        getattr(module, f"{prefix}val").copy_(torch.from_numpy(m.data.astype(np.float32)))


def _csr_view(module: nn.Module, prefix: str, shape: tuple[int, int], values: bool = True) -> sp.csr_matrix:
    """The scipy view of ``_csr_buffers``, rebuilt only when the buffers change (load_state_dict, .to)."""
    bufs = [getattr(module, f"{prefix}{n}") for n in (("crow", "col", "val") if values else ("crow", "col"))]
    key = tuple((t.data_ptr(), t._version) for t in bufs)
    cache = module.__dict__.setdefault("_csr_views", {})
    if prefix not in cache or cache[prefix][0] != key:
        col = bufs[1].cpu().numpy()
        data = bufs[2].cpu().numpy() if values else np.ones(len(col), np.float32)
        cache[prefix] = (key, sp.csr_matrix((data, col, bufs[0].cpu().numpy()), shape=shape))
    return cache[prefix][1]


def _bag_to_csr(
    input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, cols: int
) -> sp.csr_matrix:
    """An EmbeddingBag-style sparse batch (ids, offsets, per-id weights) as a (B, cols) scipy CSR matrix."""
    indptr = np.append(offsets.cpu().numpy(), input.numel())
    return sp.csr_matrix(
        (weights.detach().float().cpu().numpy(), input.cpu().numpy(), indptr), shape=(offsets.numel(), cols)
    )


class LexicalScorer(nn.Module):
    """Cosine of a document's sparse TF-IDF with each label centroid (and, for MHC, each group centroid),
    times a learned weight: the lexical signal that a low-rank neural score misses on short keyword-like
    texts, added to the ranker's logits (and to the group logits, so the right groups become candidates).

    The centroids are stored transposed (F, N [+ G]) as CSR buffers so ``model.pt`` carries them; ``nnz``
    fixes the buffer sizes when a saved model is rebuilt. The product runs in scipy on the CPU.
    """

    def __init__(
        self, num_features: int, num_labels: int, nnz: int, weight: float = 4.0, num_groups: int = 0
    ):
        super().__init__()
        self.num_labels = num_labels
        self.shape = (num_features, num_labels + num_groups)
        _csr_buffers(self, "", num_features, nnz)
        self.weight = nn.Parameter(torch.tensor(float(weight)))
        self.group_weight = nn.Parameter(torch.tensor(float(weight))) if num_groups else None

    def set_centroids(self, centroids: sp.csr_matrix) -> None:
        ct = centroids.T.tocsr()
        ct.sort_indices()
        if ct.shape != self.shape or ct.nnz != self.col.numel():
            raise ValueError(
                f"centroids {ct.shape} nnz {ct.nnz} do not fit {self.shape} nnz {self.col.numel()}"
            )
        _set_csr_buffers(self, "", ct)

    def cosines(self, input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Raw cosines (B, N [+ G]) with the label (and group) centroids."""
        x = _bag_to_csr(input, offsets, weights, self.shape[0])
        # scipy's sparse product: torch's CSR @ CSR on CPU leaked ~20 MB per call (torch 2.14) and is slower
        return torch.from_numpy((x @ _csr_view(self, "", self.shape)).toarray()).to(weights.device)

    def weighted(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.num_labels
        groups = self.group_weight * cos[:, n:] if self.group_weight is not None else None
        return self.weight * cos[:, :n], groups

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted cosines (B, N) with the labels and (B, G) with the groups (None without groups)."""
        return self.weighted(self.cosines(input, offsets, weights))


class NeighbourScorer(nn.Module):
    """Label votes of the document's nearest training documents in TF-IDF space (cosine, top ``k``,
    weights cos^``power`` normalised to sum 1): a non-parametric signal a low-rank neural ranker misses,
    added at inference as ``weight * votes`` to the model's label scores.

    The training TF-IDF (transposed, (F, D)) and labels ((D, N), binary) are CSR buffers, so ``model.pt``
    carries them; the products run in scipy on the CPU. The votes do not depend on the trained weights, so
    they are cached per batch (validation sees the same batches every epoch). A training document ranked by
    this model finds itself among its neighbours: evaluate on held-out documents.
    """

    CACHE_BATCHES = 256

    def __init__(
        self,
        num_features: int,
        num_docs: int,
        num_labels: int,
        nnz_docs: int,
        nnz_labels: int,
        k: int = 30,
        power: float = 2.0,
        weight: float = 1.0,
    ):
        super().__init__()
        if k < 1:
            raise ValueError(f"neighbours k must be >= 1, got {k}")
        self.k, self.power = int(k), float(power)
        self.docs_shape, self.labels_shape = (num_features, num_docs), (num_docs, num_labels)
        _csr_buffers(self, "docs_", num_features, nnz_docs)
        _csr_buffers(self, "labels_", num_docs, nnz_labels, values=False)
        self.register_buffer("weight", torch.tensor(float(weight)))
        self._cache: OrderedDict[bytes, sp.csr_matrix] = OrderedDict()

    def extra_repr(self) -> str:
        return f"docs={self.docs_shape[1]}, labels={self.labels_shape[1]}, k={self.k}, power={self.power}"

    def set_data(self, features: sp.csr_matrix, labels: sp.csr_matrix) -> None:
        """``features`` (D, F) L2-normalised training TF-IDF, ``labels`` (D, N) their label sets."""
        docs_t = features.T.tocsr()
        docs_t.sort_indices()
        lab = sp.csr_matrix(labels)
        lab.sort_indices()
        if docs_t.shape != self.docs_shape or lab.shape != self.labels_shape:
            raise ValueError(
                f"neighbour data {docs_t.shape}/{lab.shape} != {self.docs_shape}/{self.labels_shape}"
            )
        if docs_t.nnz != self.docs_col.numel() or lab.nnz != self.labels_col.numel():
            raise ValueError("neighbour data nnz does not match the buffers")
        _set_csr_buffers(self, "docs_", docs_t)
        _set_csr_buffers(self, "labels_", lab, values=False)
        self._cache.clear()

    def votes(self, x: sp.csr_matrix, exclude: np.ndarray | None = None) -> sp.csr_matrix:
        """(B, N) sparse votes for the (B, F) sparse documents ``x``: the neighbour weights of each row sum to
        1, so a label's vote is the weighted share of the neighbours that carry it. ``exclude[i]`` (a training
        document id, or -1) is left out of row i's neighbours: leave-one-out votes for training documents."""
        docs = _csr_view(self, "docs_", self.docs_shape)
        labels = _csr_view(self, "labels_", self.labels_shape, values=False)
        sims = (x @ docs).tocsr()
        rows, cols, vals = [], [], []
        for i in range(sims.shape[0]):
            s, e = sims.indptr[i], sims.indptr[i + 1]
            idx, val = sims.indices[s:e], sims.data[s:e]
            if exclude is not None and exclude[i] >= 0:
                keep = idx != exclude[i]
                idx, val = idx[keep], val[keep]
            if len(val) > self.k:
                top = np.argpartition(-val, self.k - 1)[: self.k]
                idx, val = idx[top], val[top]
            w = np.power(np.maximum(val, 0.0), self.power)
            total = float(w.sum())
            if total > 0:
                rows.append(np.full(len(idx), i))
                cols.append(idx)
                vals.append(w / total)
        if not rows:
            return sp.csr_matrix((sims.shape[0], labels.shape[1]), dtype=np.float32)
        near = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sims.shape
        )
        return (near @ labels).tocsr()

    def forward(self, input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dense (B, N) ``weight * votes`` for an EmbeddingBag-style sparse batch."""
        data = (self.docs_crow, self.docs_col, self.docs_val, self.labels_crow, self.labels_col)
        key = hashlib.blake2b(  # the batch, and the version of the neighbour data (load_state_dict, .to)
            repr([(t.data_ptr(), t._version) for t in data]).encode()
            + b"".join(t.detach().cpu().numpy().tobytes() for t in (input, offsets, weights)),
            digest_size=16,
        ).digest()
        votes = self._cache.get(key)
        if votes is None:
            votes = self.votes(_bag_to_csr(input, offsets, weights, self.docs_shape[0]))
            self._cache[key] = votes
            if len(self._cache) > self.CACHE_BATCHES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return self.weight * torch.from_numpy(votes.toarray()).to(weights.device)
