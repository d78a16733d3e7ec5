"""XMC model = encoder (tfidf | hf) + a core multi-label head (``flat`` = ``linear_multilabel`` BCE,
``mhc`` = ``mhc_multilabel`` cascade), built by ``mhe_plugins.heads.build_head``.

Both heads take the padded label tensor (B, L; -1 = padding) through the one contract (``head(x, labels,
...)``, ``topk``, ``candidate_scores``), so nothing here branches on the head type for training or ranking.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.preprocessing import normalize
from torch import nn

from mhe_plugins.heads import build_head
from mhe_plugins.heads.linear import ranked_candidates
from xmc.encoders import HFEncoder, SparseEncoder


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

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted cosines (B, N) with the labels and (B, G) with the groups (None without groups)."""
        x = _bag_to_csr(input, offsets, weights, self.shape[0])
        # scipy's sparse product: torch's CSR @ CSR on CPU leaked ~20 MB per call (torch 2.14) and is slower
        cos = torch.from_numpy((x @ _csr_view(self, "", self.shape)).toarray()).to(weights.device)
        n = self.num_labels
        groups = self.group_weight * cos[:, n:] if self.group_weight is not None else None
        return self.weight * cos[:, :n], groups


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

    def votes(self, x: sp.csr_matrix) -> sp.csr_matrix:
        """(B, N) sparse votes for the (B, F) sparse documents ``x``: the neighbour weights of each row sum to
        1, so a label's vote is the weighted share of the neighbours that carry it."""
        docs = _csr_view(self, "docs_", self.docs_shape)
        labels = _csr_view(self, "labels_", self.labels_shape, values=False)
        sims = (x @ docs).tocsr()
        rows, cols, vals = [], [], []
        for i in range(sims.shape[0]):
            s, e = sims.indptr[i], sims.indptr[i + 1]
            idx, val = sims.indices[s:e], sims.data[s:e]
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


def default_hidden_dim(feature_dim: int) -> int:
    """Label-embedding width for MHC: a quarter of the feature, 32..300 (LightXML used 300-500 on 3840). With
    the neighbour votes a wider embedding (= feature) measured no better on FOLDOC-XMC (docs/xmc.md) for 4x
    the label-side parameters."""
    return int(min(300, max(32, feature_dim // 4)))


class XMCModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_labels: int, num_features: int | None = None, hf_config=None):
        """``cfg`` is the saved model config (encoder/head settings); ``hf_config`` rebuilds an HF
        encoder without its pretrained weights (they come from our checkpoint)."""
        super().__init__()
        self.cfg = dict(cfg)
        self.candidate_loss = cfg.get("candidate_loss", "bce")
        self.lexical = None
        if cfg["encoder"] == "tfidf":
            self.encoder = SparseEncoder(
                num_features,
                cfg["tfidf_dim"],
                cfg["dropout"],
                layers=cfg.get("tfidf_layers", 0),
                sparse=cfg.get("sparse_grad", False),
            )
        else:
            if cfg.get("lexical_nnz") is not None:
                raise ValueError("the lexical ranker term needs the TF-IDF encoder (sparse input)")
            self.encoder = HFEncoder(
                cfg.get("model_path"), cfg["feature_layers"], cfg["dropout"], config=hf_config
            )
        d = self.encoder.out_features
        if cfg["head"] == "flat":
            self.head = build_head("linear_multilabel", d, num_labels)
        elif cfg["head"] == "mhc":
            self.head = build_head(
                "mhc_multilabel",
                d,
                num_labels,
                num_groups=cfg.get("num_groups"),
                hidden_dim=cfg.get("hidden_dim") or default_hidden_dim(d),
                candidates_topk=cfg.get("candidates_topk"),
                permutation_seed=cfg.get("permutation_seed"),
            )
        else:
            raise ValueError(f"unknown head {cfg['head']!r} (mhc|flat)")
        lexical_nnz = cfg.get("lexical_nnz")
        if cfg["encoder"] == "tfidf" and lexical_nnz is not None:
            g = self.head.num_groups if cfg["head"] == "mhc" else 0
            self.lexical = LexicalScorer(num_features, num_labels, lexical_nnz, cfg["lexical_weight"], g)
        self.neighbours = None
        nb = cfg.get("neighbour_nnz")
        if cfg["encoder"] == "tfidf" and nb is not None:
            self.neighbours = NeighbourScorer(
                num_features,
                nb["docs"],
                num_labels,
                nb["docs_nnz"],
                nb["labels_nnz"],
                k=cfg["neighbours"],
                power=cfg.get("neighbour_power", 2.0),
                weight=cfg.get("neighbour_weight", 1.0),
            )

    def lexical_centroids(self, features: sp.csr_matrix, labels: sp.csr_matrix) -> sp.csr_matrix:
        """(N [+ G], F) label (and group) centroids of the training documents, for :class:`LexicalScorer`."""
        c = label_centroids(features, labels)
        if self.cfg["head"] == "flat":
            return c
        group_of = self.head.group_of_global().cpu().numpy()
        return sp.vstack([c, group_centroids(features, labels, group_of, self.head.num_groups)]).tocsr()

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**inputs)

    def _bias(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The lexical term as the head's external logits: per label, and per group for the cascade."""
        if self.lexical is None:
            return {}
        lex, lex_groups = self.lexical(**inputs)
        bias = {"label_bias": lex}
        if lex_groups is not None:
            bias["group_bias"] = lex_groups
        return bias

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Training loss (forward is the loss so DDP sees one call per step)."""
        x = self.features(inputs)
        return self.head(x, labels, candidate_loss=self.candidate_loss, **self._bias(inputs)).loss

    @torch.no_grad()
    def topk(self, inputs: dict[str, torch.Tensor], k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores in [0, 1], label ids) of the head, mixed with the neighbour votes when they are on:
        ((head score, 0 for labels the head did not rank) + weight * votes) / (1 + weight)."""
        x = self.features(inputs)
        bias = self._bias(inputs)
        near = (
            self.neighbours(**inputs) if self.neighbours is not None and self.neighbours.weight > 0 else None
        )
        if near is None:
            return self.head.topk(x, k, **bias)
        scores, ids = self.head.candidate_scores(x, **bias)
        total = near.float().clone()
        total.scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, scores, torch.zeros_like(scores)))
        total = total / (1.0 + self.neighbours.weight)  # scores stay in [0, 1]; the ranking is unchanged
        return ranked_candidates(total, torch.arange(total.shape[1], device=total.device).expand_as(total), k)
