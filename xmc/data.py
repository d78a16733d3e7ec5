"""Readers for the two XMC dataset formats users have, and the label vocabulary.

* ``raw``: AttentionXML/LightXML raw text. ``{split}_texts.txt`` (or ``{split}_raw_texts.txt``) and
  ``{split}_labels.txt``, one document per line, labels space-separated tokens. Only ``\n`` (or ``\r\n``)
  ends a line; a stray ``\r`` or a BOM after the file's start is an error naming file:line
  (:func:`xmc.io.read_lines`).
* ``bow``: Extreme Classification Repository BoW. Header ``num_points num_features num_labels``, then
  ``l1,l2 f:v f:v ...`` with 0-based ids; parsed by scikit-learn's svmlight reader.

Any file may be ``.xz``/``.gz``/``.bz2`` compressed. Policies: an empty label line is a document with
no labels (kept; it is an all-negative example in training and scores 0 in P@k, as in pyxclib).
When a dataset has no ``valid`` split a seeded slice of train becomes the validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmc.io import DECOMPRESS_ERRORS, InputFileError, find_file, open_binary, read_lines

SPLITS = ("train", "valid", "test")


class DataFormatError(InputFileError):
    """A dataset file is malformed; the message names the file, the line and the value."""


@dataclass
class XMCSplit:
    """One split: raw texts (raw format) or sparse features (bow format), and label indicator rows."""

    labels: sp.csr_matrix  # (n_docs, num_labels) 0/1
    texts: list[str] | None = None
    features: sp.csr_matrix | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, idx: np.ndarray) -> XMCSplit:
        return XMCSplit(
            labels=self.labels[idx],
            texts=[self.texts[i] for i in idx] if self.texts is not None else None,
            features=self.features[idx] if self.features is not None else None,
        )

    def label_lists(self) -> list[np.ndarray]:
        y = self.labels
        return [y.indices[y.indptr[i] : y.indptr[i + 1]] for i in range(y.shape[0])]


@dataclass
class XMCDataset:
    splits: dict[str, XMCSplit]
    label_vocab: list[str]
    format: str
    num_features: int | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_vocab)


def _indicator(rows: list[list[int]] | list[np.ndarray], num_labels: int) -> sp.csr_matrix:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
    y = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), num_labels))
    y.sum_duplicates()
    y.data[:] = 1.0
    return y


# ----------------------------------------------------------------------------- raw text format
def _raw_paths(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    texts = find_file(data_dir, f"{split}_texts.txt") or find_file(data_dir, f"{split}_raw_texts.txt")
    labels = find_file(data_dir, f"{split}_labels.txt")
    if texts is None and labels is None:
        return None
    if texts is None or labels is None:
        have = texts or labels
        raise DataFormatError(f"{have}: found without its partner ({split}_texts.txt / {split}_labels.txt)")
    return texts, labels


def read_raw_split(data_dir: str | Path, split: str) -> tuple[list[str], list[list[str]]] | None:
    """Texts and label-token lists of one split, or None when the split's files are absent."""
    paths = _raw_paths(Path(data_dir), split)
    if paths is None:
        return None
    texts = read_lines(paths[0])
    label_lines = read_lines(paths[1])
    if len(texts) != len(label_lines):
        raise DataFormatError(
            f"{paths[1]}: has {len(label_lines)} lines but {paths[0]} has {len(texts)}; "
            f"line {min(len(texts), len(label_lines)) + 1} has no partner"
        )
    return texts, [line.split() for line in label_lines]


def _read_raw(data_dir: Path, label_vocab: list[str] | None) -> XMCDataset:
    raw = {s: r for s in SPLITS if (r := read_raw_split(data_dir, s)) is not None}
    if "train" not in raw and label_vocab is None:
        raise FileNotFoundError(f"{data_dir}: no train_texts.txt/train_labels.txt (raw format)")
    if label_vocab is None:  # fixed label space = every token of every split, sorted (as XC datasets do)
        label_vocab = sorted({tok for _, lists in raw.values() for toks in lists for tok in toks})
    index = {tok: i for i, tok in enumerate(label_vocab)}
    splits = {}
    for s, (texts, lists) in raw.items():
        # tokens unknown to a saved model's vocabulary cannot be predicted; they are dropped from truth
        rows = [[index[t] for t in toks if t in index] for toks in lists]
        splits[s] = XMCSplit(labels=_indicator(rows, len(label_vocab)), texts=texts)
    return XMCDataset(splits, label_vocab, "raw")


# ----------------------------------------------------------------------------- XC BoW format
BOM = b"\xef\xbb\xbf"


def _locate_bow_error(path: Path, num_features: int, num_labels: int) -> str | None:
    """Slow path, only after the fast reader failed or its result failed a check: the first bad line,
    numbered as in the file (blank and comment lines count)."""
    with open_binary(path) as fh:
        fh.readline()
        for lineno, raw in enumerate(fh, 2):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"{path}:{lineno}: not UTF-8 text ({raw[:40]!r})"
            line = text.rstrip("\r\n").split("#", 1)[0]
            if not line.strip():
                continue
            toks = line.split(" ")
            lab, feats = (toks[0], toks[1:]) if ":" not in toks[0] else ("", toks)
            for t in filter(None, lab.split(",")):
                if not t.isdigit():  # '1.5' or '-1' would be truncated or wrap around
                    return f"{path}:{lineno}: label {t!r} is not a non-negative integer"
                if not 0 <= int(t) < num_labels:
                    return f"{path}:{lineno}: label id {t} out of range [0, {num_labels})"
            last = -1
            for f in filter(None, feats):
                k, _, v = f.partition(":")
                try:
                    k_i, v_f = int(k), float(v)
                except ValueError:
                    return f"{path}:{lineno}: malformed feature {f!r} (expected index:value)"
                if not 0 <= k_i < num_features:
                    return f"{path}:{lineno}: feature index {k_i} out of range [0, {num_features})"
                if not math.isfinite(v_f):
                    return f"{path}:{lineno}: feature value {f!r} is not finite"
                if k_i <= last:
                    return f"{path}:{lineno}: feature indices must be sorted and unique (at {f!r})"
                last = k_i
    return None


def _bad_bow(path: Path, n_features: int, n_labels: int, fallback: str) -> DataFormatError:
    return DataFormatError(_locate_bow_error(path, n_features, n_labels) or f"{path}: {fallback}")


def read_bow_file(path: str | Path) -> tuple[sp.csr_matrix, list[tuple[float, ...]], int]:
    """Read one XC BoW file: (features CSR, label tuples, num_labels from the header).

    scikit-learn's fast reader does the parsing; what it accepts silently (fractional or negative labels,
    nan/inf values) is checked afterwards, and every error is located by a slow re-read that names the line.
    """
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    fh = open_binary(path)
    try:
        with fh:
            raw = fh.readline()
            if raw.startswith(BOM):
                raw = raw[len(BOM) :]
            header = raw.decode("utf-8", "replace").strip()
            parts = header.split()
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise DataFormatError(
                    f"{path}:1: malformed header {header!r} (expected 'num_points num_features num_labels')"
                )
            n_points, n_features, n_labels = map(int, parts)
            try:
                x, y = load_svmlight_file(fh, n_features=n_features, multilabel=True, zero_based=True)
            except ValueError as exc:
                raise DataFormatError(
                    f"{_locate_bow_error(path, n_features, n_labels) or f'{path}: unreadable'} ({exc})"
                ) from exc
    except DECOMPRESS_ERRORS as exc:
        raise InputFileError(
            f"{path}: cannot decompress ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
        ) from exc
    if x.shape[0] != n_points:
        raise DataFormatError(
            f"{path}:1: header says {n_points} points but the file has {x.shape[0]} data lines"
        )
    for labs in y:
        if labs and (min(labs) < 0 or max(labs) >= n_labels or any(v != int(v) for v in labs)):
            raise _bad_bow(path, n_features, n_labels, f"bad label in {labs}")
    if x.nnz and not np.isfinite(x.data).all():
        raise _bad_bow(path, n_features, n_labels, "non-finite feature value")
    return x.tocsr().astype(np.float32), y, n_labels


def _read_bow(data_dir: Path) -> XMCDataset:
    found = {}
    for s in SPLITS:
        p = find_file(data_dir, f"{s}.txt") or find_file(data_dir, f"{s}_data.txt")
        if p is None and s == "train":
            p = find_file(data_dir, "trn.txt")
        if p is None and s == "test":
            p = find_file(data_dir, "tst.txt")
        if p is not None:
            found[s] = p
    if "train" not in found:
        raise FileNotFoundError(f"{data_dir}: no train.txt / train_data.txt (XC BoW format)")
    splits, sizes = {}, {}
    for s, p in found.items():
        x, y, n_labels = read_bow_file(p)
        sizes[s] = (x.shape[1], n_labels, p)
        splits[s] = (x, y)
    (nf, nl, p0) = sizes["train"]
    for f, l_, p in sizes.values():
        if (f, l_) != (nf, nl):
            raise DataFormatError(f"{p}:1: header has {f} features / {l_} labels but {p0} has {nf} / {nl}")
    out = {
        s: XMCSplit(labels=_indicator([np.asarray(t, np.int64) for t in y], nl), features=x)
        for s, (x, y) in splits.items()
    }
    return XMCDataset(out, [str(i) for i in range(nl)], "bow", num_features=nf)


# ----------------------------------------------------------------------------- entry point
def detect_format(data_dir: str | Path) -> str:
    d = Path(data_dir)
    if _raw_paths(d, "train") is not None:
        return "raw"
    if any(find_file(d, n) for n in ("train.txt", "train_data.txt", "trn.txt")):
        return "bow"
    raise FileNotFoundError(
        f"{d}: neither raw (train_texts.txt + train_labels.txt) nor BoW (train.txt) files"
    )


def load_dataset(
    data_dir: str | Path,
    fmt: str = "auto",
    valid_size: int | float = 0.05,
    seed: int = 1240,
    label_vocab: list[str] | None = None,
) -> XMCDataset:
    """Load a dataset directory; make a seeded validation slice of train when ``valid`` is absent."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    fmt = detect_format(data_dir) if fmt == "auto" else fmt
    if fmt == "raw":
        ds = _read_raw(data_dir, label_vocab)
    elif fmt == "bow":
        ds = _read_bow(data_dir)
    else:
        raise ValueError(f"unknown format {fmt!r} (raw|bow|auto)")
    if "train" in ds.splits and "valid" not in ds.splits:
        ds.splits["train"], ds.splits["valid"] = split_validation(ds.splits["train"], valid_size, seed)
    return ds


def split_validation(train: XMCSplit, valid_size: int | float, seed: int) -> tuple[XMCSplit, XMCSplit]:
    """Seeded slice of train as validation (never the test set for model selection)."""
    n = len(train)
    n_valid = int(round(valid_size * n)) if isinstance(valid_size, float) else int(valid_size)
    n_valid = max(1, min(n_valid, n - 1))
    perm = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(perm[n_valid:])), train.subset(np.sort(perm[:n_valid]))
