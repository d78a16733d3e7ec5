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
    """Builds ``{"inputs": ..., "labels": (B, L) -1 padded, "index": (B,)}`` for a list of doc indices.

    Inputs: the sparse TF-IDF bag (``features``), the transformer's token ids (``token_ids`` pre-tokenized
    once, or ``texts`` + ``tokenizer`` on the fly) and/or precomputed embeddings (``embeddings``, rows
    ``emb``); the hybrid encoder takes the bag plus tokens or embeddings.
    """

    def __init__(
        self,
        labels: sp.csr_matrix | None,
        features: sp.csr_matrix | None = None,
        texts: Sequence[str] | None = None,
        tokenizer=None,
        max_len: int = 128,
        token_ids: Sequence[Sequence[int]] | None = None,
        embeddings: np.ndarray | None = None,
        tokens: bool | None = None,
    ):
        self.labels, self.features, self.texts = labels, features, texts
        self.tokenizer, self.max_len = tokenizer, max_len
        self.token_ids, self.embeddings = token_ids, embeddings
        # tokens are needed unless a precomputed embedding or the bag alone carries the document
        self.tokens = tokens if tokens is not None else (embeddings is None and features is None)
        if self.tokens and token_ids is None and (texts is None or tokenizer is None):
            raise ValueError("Collator needs sparse features, embeddings, token ids or texts + a tokenizer")
        if features is None and embeddings is None and not self.tokens:
            raise ValueError("Collator has nothing to encode")

    def lengths(self) -> np.ndarray | None:
        """Token counts per document (pre-tokenized only), for length-bucketed batches."""
        return None if self.token_ids is None else np.array([len(t) for t in self.token_ids])

    def inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.features is not None:
            out.update(csr_to_bag(self.features[idx]))
        if self.embeddings is not None:
            out["emb"] = torch.from_numpy(np.ascontiguousarray(self.embeddings[idx], dtype=np.float32))
        elif self.tokens and self.token_ids is not None:
            from xmc.embcache import pad_token_ids

            pad = (self.tokenizer.pad_token_id or 0) if self.tokenizer is not None else 0
            out.update(pad_token_ids([self.token_ids[i] for i in idx], pad))
        elif self.tokens:
            enc = self.tokenizer(
                [self.texts[i] for i in idx],
                truncation=True,
                max_length=self.max_len,
                padding=True,
                return_tensors="pt",
            )
            out.update(
                {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            )
        return out

    def __call__(self, batch: Sequence[int]) -> dict:
        idx = np.asarray(batch, dtype=np.int64)
        out = {"inputs": self.inputs(idx), "index": torch.from_numpy(idx)}
        if self.labels is not None:
            y = self.labels[idx]
            out["labels"] = pad_labels([y.indices[y.indptr[i] : y.indptr[i + 1]] for i in range(len(idx))])
        return out


class LengthBucketBatchSampler:
    """Batches of documents of similar token length (far less padding for a transformer on CPU): each epoch
    a seeded permutation is cut into chunks of ``bucket`` batches, each chunk is sorted by length and cut
    into batches, and the batches are shuffled. Under DDP each rank takes every ``world``-th batch of the
    same list (all ranks get the same number of batches; the last few are dropped to even them out)."""

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        bucket: int = 50,
    ):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), int(batch_size), int(seed)
        self.rank, self.world, self.bucket, self.epoch = rank, world, bucket, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.lengths))
        chunk = self.batch_size * self.world * self.bucket
        batches = []
        for s in range(0, len(perm), chunk):
            part = perm[s : s + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        n = (len(batches) // self.world) * self.world if self.world > 1 else len(batches)
        return batches[:n][self.rank :: self.world]

    def __iter__(self):
        for b in self._batches():
            yield b.tolist()

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)
        return n // self.world if self.world > 1 else n


def to_device(batch: dict, device: torch.device) -> dict:
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}
    out = dict(batch, inputs=inputs)
    if "labels" in batch:
        out["labels"] = batch["labels"].to(device, non_blocking=True)
    return out
