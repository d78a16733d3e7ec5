"""Turning a split into model batches: encoder inputs + padded label ids (no label truncation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from mhe_plugins.heads.mhc_multilabel import pad_labels
from xmc.encoders import csr_to_bag


class IndexDataset(Dataset):
    """Yields document indices; the collator does the (vectorised) work per batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Collator:
    """Builds ``{"inputs": ..., "labels": (B, L) -1 padded, "index": (B,)}`` for a list of doc indices."""

    def __init__(
        self,
        labels: sp.csr_matrix | None,
        features: sp.csr_matrix | None = None,
        texts: Sequence[str] | None = None,
        tokenizer=None,
        max_len: int = 128,
    ):
        if features is None and (texts is None or tokenizer is None):
            raise ValueError("Collator needs sparse features or texts + a tokenizer")
        self.labels, self.features, self.texts = labels, features, texts
        self.tokenizer, self.max_len = tokenizer, max_len

    def inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return csr_to_bag(self.features[idx])
        enc = self.tokenizer(
            [self.texts[i] for i in idx],
            truncation=True,
            max_length=self.max_len,
            padding=True,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def __call__(self, batch: Sequence[int]) -> dict:
        idx = np.asarray(batch, dtype=np.int64)
        out = {"inputs": self.inputs(idx), "index": torch.from_numpy(idx)}
        if self.labels is not None:
            y = self.labels[idx]
            out["labels"] = pad_labels([y.indices[y.indptr[i] : y.indptr[i + 1]] for i in range(len(idx))])
        return out


def to_device(batch: dict, device: torch.device) -> dict:
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}
    out = dict(batch, inputs=inputs)
    if "labels" in batch:
        out["labels"] = batch["labels"].to(device, non_blocking=True)
    return out
