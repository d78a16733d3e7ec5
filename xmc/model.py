"""XMC model = encoder (tfidf | hf) + a core multi-label head (``flat`` = ``linear_multilabel`` BCE,
``mhc`` = ``mhc_multilabel`` cascade), built by ``mhe_plugins.heads.build_head``.

Both heads take the padded label tensor (B, L; -1 = padding) through the one contract (``head(x, labels,
...)``, ``topk``, ``candidate_scores``), so nothing here branches on the head type for training or ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from mhe_plugins.heads import build_head
from mhe_plugins.heads.linear import ranked_candidates
from xmc.encoders import HFEncoder, HybridEncoder, SparseEncoder
from xmc.scorers import (  # noqa: F401  (re-exported: xmc.model is where callers find them)
    LexicalScorer,
    NeighbourScorer,
    _bag_to_csr,
    _csr_buffers,
    _csr_view,
    _set_csr_buffers,
    group_centroids,
    label_centroids,
)

BAG_KEYS = ("input", "offsets", "weights")
SPARSE_ENCODERS = ("tfidf", "hybrid")  # encoders whose batches carry the TF-IDF bag


class LearnedRanker(nn.Module):
    """A sparse/low-rank linear re-ranker over the top ``shortlist`` labels of the hand-weighted score
    (cascade + lexical term + neighbour votes), fitted after training (:mod:`xmc.ranker`).

    Per (document, label) pair it combines the features of :data:`RANKER_FEATURES` (the cascade's label and
    group logits and product score, the raw lexical cosines, the neighbour vote, the label prior, the cosine
    of the transformer embedding with the label's embedding centroid, and ``linear``: per-label sparse weights
    on the TF-IDF, ``x . W_l + b_l``, trained on the cascade's hard negatives of the training documents) with
    standardised, learned coefficients; the score is ``sigmoid(a * coef . phi + b)``. Everything is a
    tensor buffer (``W`` as transposed CSR), so ``model.pt`` carries it and loads with ``weights_only``.
    """

    def __init__(self, num_features: int, num_labels: int, nnz: int, shortlist: int = 100, emb_dim: int = 0):
        super().__init__()
        p = len(RANKER_FEATURES)
        self.num_labels = num_labels
        self.w_shape = (num_features, num_labels)
        _csr_buffers(self, "w_", num_features, nnz)
        self.register_buffer("bias", torch.zeros(num_labels))
        self.register_buffer("prior", torch.zeros(num_labels))
        self.register_buffer("coef", torch.zeros(p))
        self.register_buffer("mean", torch.zeros(p))
        self.register_buffer("scale", torch.ones(p))
        self.register_buffer("calib", torch.tensor([1.0, 0.0]))
        self.register_buffer("shortlist", torch.tensor(int(shortlist)))
        self.emb_dim = int(emb_dim)
        if emb_dim:
            self.register_buffer("emb_centroids", torch.zeros(num_labels, emb_dim))
        else:
            self.emb_centroids = None

    @classmethod
    def from_state(cls, state: dict, prefix: str = "ranker.") -> LearnedRanker:
        """An empty ranker shaped to load ``state`` (sizes come from the tensors)."""
        emb = state.get(f"{prefix}emb_centroids")
        return cls(
            int(state[f"{prefix}w_crow"].numel() - 1),
            int(state[f"{prefix}bias"].numel()),
            int(state[f"{prefix}w_col"].numel()),
            int(state[f"{prefix}shortlist"]),
            int(emb.shape[1]) if emb is not None else 0,
        )

    def extra_repr(self) -> str:
        return f"labels={self.num_labels}, nnz={self.w_col.numel()}, shortlist={int(self.shortlist)}"

    def set_weights(self, w_t: sp.csr_matrix) -> None:
        """The per-label sparse weights, transposed (F, N) CSR with exactly the buffers' nnz."""
        w_t = sp.csr_matrix(w_t)
        w_t.sort_indices()
        if w_t.shape != self.w_shape or w_t.nnz != self.w_col.numel():
            raise ValueError(f"ranker weights {w_t.shape}/{w_t.nnz} != {self.w_shape}/{self.w_col.numel()}")
        _set_csr_buffers(self, "w_", w_t)

    def linear_scores(self, x: sp.csr_matrix) -> torch.Tensor:
        """Dense (B, N) ``x . W_l + b_l`` for the (B, F) sparse documents."""
        lin = torch.from_numpy((x @ _csr_view(self, "w_", self.w_shape)).toarray())
        return lin.to(self.bias.device) + self.bias

    def features(self, comp: dict, ids: torch.Tensor) -> torch.Tensor:
        """(B, R, P) features of the (B, R) label ids from :meth:`XMCModel.score_components`."""
        cols = []
        for name in RANKER_FEATURES:
            if name == "linear":
                v = self.linear_scores(comp["x_csr"]).gather(1, ids)
            elif name == "prior":
                v = self.prior[ids]
            elif name == "embedding":
                e = comp.get("emb")
                if e is None or self.emb_centroids is None:
                    v = torch.zeros(ids.shape, device=ids.device)
                else:
                    e = torch.nn.functional.normalize(e.float(), dim=-1)
                    v = torch.einsum("brd,bd->br", self.emb_centroids[ids], e)
            elif name == "log_head":
                v = torch.log(comp["head"].gather(1, ids) + 1e-4)
            elif name == "sqrt_vote":
                v = comp["votes"].gather(1, ids).clamp_min(0).sqrt()
            else:
                v = comp[RANKER_SOURCE.get(name, name)].gather(1, ids)
            cols.append(v.float())
        return torch.stack(cols, dim=-1)

    def logits(self, phi: torch.Tensor) -> torch.Tensor:
        return ((phi - self.mean) / self.scale) @ self.coef

    def scores(self, phi: torch.Tensor) -> torch.Tensor:
        a, b = self.calib
        return torch.sigmoid(a * self.logits(phi) + b)


#: the per-pair features of :class:`LearnedRanker` (the order of its ``coef``)
RANKER_FEATURES = (
    "stage0",  # the hand-weighted score (cascade + votes), what the shortlist is cut on
    "head",  # sigmoid(label) * sigmoid(group); 0 for a label the cascade did not rank
    "log_head",
    "candidate",  # 1 when the cascade ranked the label
    "label_logit",  # the cascade's label logit (with the lexical term), 0 when not a candidate
    "group_logit",  # the logit of the label's group (with the lexical term)
    "vote",  # the neighbour vote
    "sqrt_vote",
    "lexical",  # raw cosine with the label centroid
    "lexical_group",  # raw cosine with the group centroid
    "linear",  # per-label sparse weights on the TF-IDF + per-label bias
    "prior",  # log(1 + training documents of the label)
    "embedding",  # cosine of the transformer embedding with the label's embedding centroid
)
RANKER_SOURCE = {"vote": "votes"}


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
        self.ranker: LearnedRanker | None = None
        self.use_ranker = True
        kind = cfg["encoder"]
        if kind == "tfidf":
            self.encoder = SparseEncoder(
                num_features,
                cfg["tfidf_dim"],
                cfg["dropout"],
                layers=cfg.get("tfidf_layers", 0),
                sparse=cfg.get("sparse_grad", False),
            )
        elif kind == "hybrid":
            self.encoder = HybridEncoder(
                num_features,
                cfg.get("model_path"),
                cfg["tfidf_dim"],
                cfg["dropout"],
                tfidf_layers=cfg.get("tfidf_layers", 0),
                sparse=cfg.get("sparse_grad", False),
                config=hf_config,
                pooling=cfg.get("pooling") or "mean",
                freeze_layers=cfg.get("freeze_layers"),
                frozen=cfg.get("encoder_mode") == "frozen",
                feature_layers=cfg.get("feature_layers", 1),
            )
        elif kind == "hf":
            if cfg.get("lexical_nnz") is not None:
                raise ValueError("the lexical ranker term needs the TF-IDF encoder (sparse input)")
            self.encoder = HFEncoder(
                cfg.get("model_path"),
                cfg["feature_layers"],
                cfg["dropout"],
                config=hf_config,
                pooling=cfg.get("pooling") or "lightxml",
                freeze_layers=10**6 if cfg.get("encoder_mode") == "frozen" else cfg.get("freeze_layers"),
            )
        else:
            raise ValueError(f"unknown encoder {kind!r} (tfidf|hybrid|hf)")
        self.sparse_input = kind in SPARSE_ENCODERS
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
        if self.sparse_input and lexical_nnz is not None:
            g = self.head.num_groups if cfg["head"] == "mhc" else 0
            self.lexical = LexicalScorer(num_features, num_labels, lexical_nnz, cfg["lexical_weight"], g)
        self.neighbours = None
        nb = cfg.get("neighbour_nnz")
        if self.sparse_input and nb is not None:
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
        self.num_features = num_features

    # ------------------------------------------------------------------ ranker
    def attach_ranker(self, ranker: LearnedRanker | None) -> None:
        self.ranker = ranker

    def attach_ranker_for(self, state: dict) -> None:
        """Before ``load_state_dict``: give the model the (empty) ranker that ``state`` holds, if any."""
        if any(k.startswith("ranker.") for k in state):
            self.ranker = LearnedRanker.from_state(state).to(next(self.parameters()).device)
        else:
            self.ranker = None

    # ------------------------------------------------------------------ encoding
    def lexical_centroids(self, features: sp.csr_matrix, labels: sp.csr_matrix) -> sp.csr_matrix:
        """(N [+ G], F) label (and group) centroids of the training documents, for :class:`LexicalScorer`."""
        c = label_centroids(features, labels)
        if self.cfg["head"] == "flat":
            return c
        group_of = self.head.group_of_global().cpu().numpy()
        return sp.vstack([c, group_centroids(features, labels, group_of, self.head.num_groups)]).tocsr()

    @staticmethod
    def bag(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: inputs[k] for k in BAG_KEYS}

    def encode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the head's input feature, the transformer's pooled embedding or None)."""
        if isinstance(self.encoder, HybridEncoder):
            emb = self.encoder.embedding(inputs)
            return self.encoder(inputs, emb=emb), emb
        if isinstance(self.encoder, SparseEncoder):
            return self.encoder(**self.bag(inputs)), None
        tok = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        return self.encoder(**tok), None

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(inputs)[0]

    def _bias(self, inputs: dict[str, torch.Tensor], cos: torch.Tensor | None = None) -> dict:
        """The lexical term as the head's external logits: per label, and per group for the cascade."""
        if self.lexical is None:
            return {}
        lex, lex_groups = self.lexical.weighted(
            cos if cos is not None else self.lexical.cosines(**self.bag(inputs))
        )
        bias = {"label_bias": lex}
        if lex_groups is not None:
            bias["group_bias"] = lex_groups
        return bias

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Training loss (forward is the loss so DDP sees one call per step)."""
        x = self.features(inputs)
        return self.head(x, labels, candidate_loss=self.candidate_loss, **self._bias(inputs)).loss

    def _votes_on(self) -> bool:
        return self.neighbours is not None and float(self.neighbours.weight) > 0

    @torch.no_grad()
    def stage0(self, inputs: dict[str, torch.Tensor], x: torch.Tensor, bias: dict) -> tuple:
        """The hand-weighted ranking: (scores, ids) of the head's candidates, or with the neighbour votes
        ((head score, 0 for labels the head did not rank) + weight * votes) / (1 + weight) over all N."""
        if not self._votes_on():
            return self.head.candidate_scores(x, **bias)
        near = self.neighbours(**self.bag(inputs))
        scores, ids = self.head.candidate_scores(x, **bias)
        total = near.float().clone()
        total.scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, scores, torch.zeros_like(scores)))
        total = total / (1.0 + self.neighbours.weight)  # scores stay in [0, 1]; the ranking is unchanged
        return total, torch.arange(total.shape[1], device=total.device).expand_as(total)

    @torch.no_grad()
    def score_components(self, inputs: dict[str, torch.Tensor], exclude: np.ndarray | None = None) -> dict:
        """Dense (B, N) per-label signals for the learned ranker: ``stage0`` (the hand-weighted score),
        ``head``, ``candidate``, ``label_logit``, ``group_logit``, ``votes`` (unweighted; leave-one-out for the
        training documents ``exclude``), ``lexical``, ``lexical_group``; plus ``x_csr`` (the sparse TF-IDF)
        and ``emb`` (the transformer embedding or None)."""
        if not self.sparse_input:
            raise ValueError("the learned ranker needs the TF-IDF features (--encoder tfidf or hybrid)")
        x, emb = self.encode(inputs)
        bag = self.bag(inputs)
        n = self.head.num_labels
        b = x.shape[0]
        dev = x.device
        cos = self.lexical.cosines(**bag) if self.lexical is not None else None
        bias = self._bias(inputs, cos)
        zeros = torch.zeros(b, n, device=dev)
        comp = {"x_csr": _bag_to_csr(*bag.values(), self.num_features), "emb": emb}
        if self.cfg["head"] == "mhc":
            out = self.head.candidates(x, None, **bias)
            ids = torch.where(out.candidate_mask, self.head.candidate_global_ids(out), -1)
            ok = ids >= 0
            safe = ids.clamp_min(0)
            ll = out.candidate_logits.float()
            score = torch.sigmoid(ll) * out.group_scores.float()
            # scatter_add: the dummy slots (id -1 -> 0, value 0) must not overwrite label 0
            comp["head"] = zeros.clone().scatter_add_(1, safe, torch.where(ok, score, 0.0))
            comp["label_logit"] = zeros.clone().scatter_add_(1, safe, torch.where(ok, ll, 0.0))
            comp["candidate"] = zeros.clone().scatter_add_(1, safe, ok.float())
            group_of = self.head.group_of_global()
            comp["group_logit"] = out.group_logits.float()[:, group_of]
        else:
            scores, _ = self.head.candidate_scores(x, **bias)
            comp["head"] = scores.float()
            comp["label_logit"] = torch.logit(scores.float(), eps=1e-6)
            comp["candidate"] = torch.ones(b, n, device=dev)
            comp["group_logit"] = zeros
        if cos is not None:
            comp["lexical"] = cos[:, :n].float()
            if cos.shape[1] > n:
                comp["lexical_group"] = cos[:, n:].float()[:, self.head.group_of_global()]
            else:
                comp["lexical_group"] = zeros
        else:
            comp["lexical"] = comp["lexical_group"] = zeros
        if self.neighbours is not None:
            if exclude is None and self._votes_on():  # the per-batch cache of the votes
                votes = self.neighbours(**bag) / self.neighbours.weight
            else:
                votes = torch.from_numpy(self.neighbours.votes(comp["x_csr"], exclude).toarray())
            comp["votes"] = votes.float().to(dev)
            w = self.neighbours.weight.float()
            comp["stage0"] = (comp["head"] + w * comp["votes"]) / (1.0 + w)
        else:
            comp["votes"] = zeros
            comp["stage0"] = comp["head"]
        return comp

    @torch.no_grad()
    def ranked(self, comp: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, ids) of the learned ranker over the stage-0 shortlist of ``comp``."""
        r = min(max(int(self.ranker.shortlist), k), comp["stage0"].shape[1])
        _, ids = comp["stage0"].topk(r, dim=1)
        # ranked on the logits (the sigmoid of the calibrated score can tie at 1.0), reported as probabilities
        vals, top = ranked_candidates(self.ranker.logits(self.ranker.features(comp, ids)), ids, k)
        a, b = self.ranker.calib
        return torch.where(top >= 0, torch.sigmoid(a * vals + b), torch.full_like(vals, -1.0)), top

    @torch.no_grad()
    def topk(self, inputs: dict[str, torch.Tensor], k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores in [0, 1], label ids): the learned ranker's when the model has one (and
        ``use_ranker``), else the head's mixed with the neighbour votes when they are on:
        ((head score, 0 for labels the head did not rank) + weight * votes) / (1 + weight)."""
        if self.ranker is not None and self.use_ranker:
            return self.ranked(self.score_components(inputs), k)
        x = self.features(inputs)
        bias = self._bias(inputs)
        if not self._votes_on():
            return self.head.topk(x, k, **bias)
        scores, ids = self.stage0(inputs, x, bias)
        return ranked_candidates(scores, ids, k)
