"""Per-dataset cache of a frozen transformer's document embeddings (the cheap encoder option).

A frozen encoder gives every document the same embedding in every epoch, so it is computed once per split
and kept on disk: ``CACHE/<digest>.npy`` (float32, one row per document) and ``CACHE/<digest>.json`` (the
key, written last: an entry without its JSON, or whose JSON does not describe its array, does not count).

The key holds everything the embedding depends on: a fingerprint of the model directory (sha256 of its
weight, config and tokenizer files), the pooling, the maximum sequence length, the split's documents (sha256
of their texts, so a validation slice carved out of train is covered too) and the sha256 of every file in
the dataset directory. The file name is a digest of the key, so changed data or settings look up another
entry and the embeddings are computed again; an entry of the same dataset folder and split made with
another key is named in the message (``data changed: ... differ``), never reused. Writes are atomic
(temporary file + rename), so a killed run leaves either a complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mhe_plugins.training import atomic_write, atomic_write_json

KEY_VERSION = 1
MODEL_FILES = (".safetensors", ".bin", ".json", ".txt", ".model")


def default_cache_dir() -> Path:
    """``$MHE_XMC_CACHE``, else ``$XDG_CACHE_HOME/mhe-xmc/embeddings`` (``~/.cache/...``)."""
    if os.environ.get("MHE_XMC_CACHE"):
        return Path(os.environ["MHE_XMC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mhe-xmc" / "embeddings"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the names and contents of the model directory's weight/config/tokenizer files (memoised
    per process on name, size and mtime)."""
    d = Path(model_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in MODEL_FILES)
    stamp = tuple((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(d)).encode() + b"\0" + file_sha256(p).encode())
        _FINGERPRINTS[stamp] = h.hexdigest()
    return _FINGERPRINTS[stamp]


def dataset_fingerprint(data_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} of every file in the dataset directory (not recursive)."""
    d = Path(data_dir)
    return {p.name: file_sha256(p) for p in sorted(d.iterdir()) if p.is_file()}


def texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\n")
    return h.hexdigest()


def cache_key(
    model_dir: str | Path,
    pooling: str,
    max_len: int,
    data_files: dict[str, str],
    split: str,
    texts: Sequence[str],
) -> dict:
    return {
        "version": KEY_VERSION,
        "model": model_fingerprint(model_dir),
        "pooling": pooling,
        "max_len": int(max_len),
        "dataset_files": dict(data_files),
        "split": split,
        "texts": texts_sha256(texts),
        "num_docs": len(texts),
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class EmbeddingCache:
    """``get_or_compute(key, compute)``: the cached array for exactly ``key``, else ``compute()`` stored."""

    def __init__(self, root: str | Path | None = None, say: Callable[[str], object] = print):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.say = say

    def paths(self, key: dict) -> tuple[Path, Path]:
        d = _digest(key)
        return self.root / f"{d}.npy", self.root / f"{d}.json"

    def load(self, key: dict) -> tuple[np.ndarray, dict] | None:
        """(array, its metadata) when a complete entry for exactly ``key`` exists, else None."""
        arr_path, meta_path = self.paths(key)
        if not (arr_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("key") != key:
            return None
        if meta.get("sha256") != file_sha256(arr_path):
            self.say(f"[mhe-xmc] embedding cache {arr_path.name}: array does not match its entry; rebuilt")
            return None
        arr = np.load(arr_path, mmap_mode=None, allow_pickle=False)
        if arr.shape[0] != key["num_docs"]:
            return None
        return arr, meta

    def stale_entries(self, key: dict, data_dir: str | None) -> list[str]:
        """Entries of the same dataset folder and split made with another key: what differs, per entry."""
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.glob("*.json")):
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            old = meta.get("key", {})
            if meta.get("data_dir") != data_dir or old.get("split") != key["split"] or old == key:
                continue
            diff = sorted(k for k in key if old.get(k) != key[k])
            if "dataset_files" in diff:
                files = {**old.get("dataset_files", {}), **key["dataset_files"]}
                changed = sorted(
                    f for f in files if old.get("dataset_files", {}).get(f) != key["dataset_files"].get(f)
                )
                diff = [d if d != "dataset_files" else f"dataset files {', '.join(changed)}" for d in diff]
            out.append(f"{p.stem}: {', '.join(diff)} differ")
        return out

    def get_or_compute(
        self, key: dict, compute: Callable[[], np.ndarray], data_dir: str | None = None
    ) -> tuple[np.ndarray, dict]:
        """(embeddings, metadata incl. ``compute_s`` = the seconds the computation took when it was made and
        ``reused``)."""
        found = self.load(key)
        if found is not None:
            arr, meta = found
            self.say(
                f"[mhe-xmc] embeddings of {key['split']} ({key['num_docs']} docs) reused from the cache "
                f"{self.paths(key)[0]} (computed in {meta.get('compute_s', 0):.0f} s)"
            )
            return arr, {**meta, "reused": True}
        stale = self.stale_entries(key, data_dir)
        why = f"; data changed since the cached entries ({'; '.join(stale)}): rebuilt" if stale else ""
        self.say(f"[mhe-xmc] computing embeddings of {key['split']} ({key['num_docs']} docs){why}")
        t0 = time.time()
        arr = np.ascontiguousarray(compute(), dtype=np.float32)
        compute_s = round(time.time() - t0, 2)
        if arr.shape[0] != key["num_docs"]:
            raise ValueError(f"computed {arr.shape[0]} embeddings for {key['num_docs']} documents")
        arr_path, meta_path = self.paths(key)
        atomic_write(arr_path, lambda fh: np.save(fh, arr, allow_pickle=False))
        meta = {
            "key": key,
            "sha256": file_sha256(arr_path),
            "shape": list(arr.shape),
            "compute_s": compute_s,
            "data_dir": data_dir,
        }
        atomic_write_json(meta, meta_path)  # the entry counts from here on
        return arr, {**meta, "reused": False}


@torch.no_grad()
def embed_texts(
    encoder,
    tokenizer,
    texts: Sequence[str],
    max_len: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Pooled embeddings (``encoder.embed``, eval mode) of ``texts``, computed in length-sorted batches (far
    less padding); returned in the input order."""
    was_training = encoder.training
    encoder.eval()
    try:
        ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), encoder.embedding_dim), dtype=np.float32)
        pad = tokenizer.pad_token_id or 0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = pad_token_ids([ids[i] for i in idx], pad)
            emb = encoder.embed(**{k: v.to(device) for k, v in batch.items()})
            out[idx] = emb.float().cpu().numpy()
        return out
    finally:
        encoder.train(was_training)


def pad_token_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest: ``input_ids`` and ``attention_mask`` (B, L)."""
    width = max([len(s) for s in seqs] + [1])
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
