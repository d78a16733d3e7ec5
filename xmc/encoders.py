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
def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(path: str | Path):
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class HFEncoder(nn.Module):
    """Local HF encoder; feature = concat of first-token states of the last ``k`` layers, dropout."""

    def __init__(
        self, model_path: str | Path | None, feature_layers: int = 5, dropout: float = 0.5, config=None
    ):
        super().__init__()
        _offline()
        from transformers import AutoConfig, AutoModel

        if config is None:  # from pretrained weights on disk; never the hub
            if model_path is None or not Path(model_path).is_dir():
                raise FileNotFoundError(f"--model-path {model_path}: not a local model directory")
            self.model = AutoModel.from_pretrained(str(model_path), local_files_only=True)
        else:  # architecture only; weights come from our checkpoint
            self.model = AutoModel.from_config(
                AutoConfig.for_model(**config) if isinstance(config, dict) else config
            )
        n_states = self.model.config.num_hidden_layers + 1
        self.k = max(1, min(feature_layers, n_states))
        self.drop = nn.Dropout(dropout)
        self.out_features = self.k * self.model.config.hidden_size

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        states = self.model(**kw).hidden_states
        return self.drop(torch.cat([states[-i][:, 0] for i in range(1, self.k + 1)], dim=-1))
