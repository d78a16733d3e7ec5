"""Ranking, metrics and loading a trained model directory (used by train, eval and predict).

Evaluation is sharded over ranks by whole batches (fixed batch boundaries), and the rankings are
gathered, so a torchrun evaluation computes the metrics of exactly the same rankings as one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from mhe_plugins import metrics as M
from mhe_plugins.distributed import all_gather_variable, get_rank, get_world_size
from mhe_plugins.training import TrainState, atomic_write_json, load_checkpoint
from xmc.batching import Collator, to_device
from xmc.data import load_dataset
from xmc.encoders import TfidfFeaturizer, l2_rows, load_tokenizer
from xmc.io import InputFileError, read_lines
from xmc.model import XMCModel

KS = (1, 3, 5)


@torch.no_grad()
def rank_documents(
    model: torch.nn.Module,
    collator: Collator,
    n: int,
    k: int = 5,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: bool = False,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids, scores), each (n, k), for documents 0..n-1; ids -1 where fewer than k exist. ``order``: the
    documents in the order to batch them (e.g. by token length, for a transformer); results are unchanged."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    world, rank = get_world_size(), get_rank()
    docs = np.arange(n) if order is None else np.asarray(order)
    starts = list(range(0, n, batch_size))[rank::world]
    idx_parts, id_parts, sc_parts = [], [], []
    try:
        for s in starts:
            batch = to_device(collator(docs[s : s + batch_size].tolist()), device)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                scores, ids = model.topk(batch["inputs"], k)
            idx_parts.append(batch["index"].to(device))
            id_parts.append(ids.long())
            sc_parts.append(scores.float())
    finally:
        model.train(was_training)  # never leave a training model in eval mode (reference bug)
    index = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long, device=device)
    ids = torch.cat(id_parts) if id_parts else torch.zeros(0, k, dtype=torch.long, device=device)
    scores = torch.cat(sc_parts) if sc_parts else torch.zeros(0, k, device=device)
    index, ids, scores = all_gather_variable(index), all_gather_variable(ids), all_gather_variable(scores)
    order = torch.argsort(index)
    return ids[order].cpu().numpy(), scores[order].cpu().numpy()


def compute_metrics(
    pred_ids: np.ndarray, truth: sp.csr_matrix, propensities: np.ndarray | None
) -> dict[str, float]:
    """P@k, nDCG@k, PSP@k (k = 1, 3, 5) in percent, on all true labels."""
    out = M.xmc_metrics(pred_ids, truth, ks=KS, propensities=propensities)
    keep = [f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in KS]
    return {key: round(float(out[key]), 4) for key in keep if key in out}


# ----------------------------------------------------------------------------- trained model dirs
class TrainedModel:
    """Everything in an output dir needed to rank new documents."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        which: str = "model.pt",
        ranker: bool = True,
    ):
        """``ranker=False`` ranks with the hand-weighted score even when ``model.pt`` holds a learned ranker
        (the ablation without it)."""
        self.dir = Path(model_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: not a trained model directory (run mhe-xmc train first)")
        self.meta = read_model_config(cfg_path)
        self.cfg = self.meta["model"]
        self.label_vocab = read_label_vocab(self.dir / "labels.txt", self.meta["num_labels"], cfg_path)
        self.device = torch.device(device)
        hf_config = None
        self.featurizer = self.tokenizer = None
        if self.cfg["encoder"] in ("tfidf", "hybrid"):
            if self.meta["format"] == "raw":
                self.featurizer = TfidfFeaturizer.load(self.dir / "tfidf.json")
        if self.cfg["encoder"] != "tfidf":
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(str(self.dir / "encoder"), local_files_only=True)
            self.tokenizer = load_tokenizer(self.dir / "encoder")
        self.model = XMCModel(
            self.cfg, len(self.label_vocab), self.meta.get("num_features"), hf_config=hf_config
        )
        if which == "model.pt" and (self.dir / "checkpoint.pt").exists():  # read-only: never repairs
            state, note = TrainState(self.dir, last="checkpoint.pt", best="model.pt").load_best("cpu")
            if note:
                print(f"[mhe-xmc] {self.dir}: {note}", file=sys.stderr)
        else:
            state = load_checkpoint(self.dir / which, map_location="cpu")
        self.model.attach_ranker_for(state["state_dict"])
        self.model.load_state_dict(state["state_dict"])
        self.model.use_ranker = ranker
        self.model.to(self.device).eval()
        prop = self.dir / "propensities.npy"
        self.propensities = np.load(prop) if prop.exists() else None

    def collator(self, texts=None, features=None, labels=None) -> Collator:
        if self.featurizer is not None and texts is not None:
            features = self.featurizer.transform(list(texts))
        elif self.meta["format"] == "bow" and features is not None:
            features = l2_rows(features)
        return Collator(
            labels,
            features=features,
            texts=texts,
            tokenizer=self.tokenizer,
            max_len=self.cfg["max_len"],
            tokens=self.tokenizer is not None,
        )


def read_model_config(path: Path) -> dict:
    """``config.json`` of a model folder, with the types the loader relies on checked (file, key, value)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not UTF-8 text ({exc})") from exc
    need = {"format": str, "num_labels": int, "model": dict}
    for key, typ in need.items():
        if key not in meta:
            raise InputFileError(f"{path}: missing key {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise InputFileError(f"{path}: {key!r} must be {typ.__name__}, got {meta[key]!r}")
    for key, typ in (("encoder", str), ("head", str), ("dropout", (int, float)), ("max_len", int)):
        val = meta["model"].get(key)
        if not isinstance(val, typ) or isinstance(val, bool):
            raise InputFileError(f"{path}: 'model.{key}' has the wrong type: {val!r}")
    return meta


def read_label_vocab(path: Path, num_labels: int, config_path: Path) -> list[str]:
    """``labels.txt`` of a model folder: exactly ``num_labels`` distinct non-empty tokens, else an error
    (a short or shuffled file would map every prediction to the wrong label)."""
    vocab = read_lines(path)
    if len(vocab) != num_labels:
        raise InputFileError(
            f"{path}: has {len(vocab)} lines but {config_path} says num_labels={num_labels}; "
            f"the label file does not belong to this model"
        )
    seen: dict[str, int] = {}
    for i, tok in enumerate(vocab, 1):
        if not tok or tok != tok.strip() or " " in tok:
            raise InputFileError(f"{path}:{i}: invalid label token {tok!r}")
        if tok in seen:
            raise InputFileError(f"{path}:{i}: label {tok!r} repeats line {seen[tok]}")
        seen[tok] = i
    return vocab


def evaluate_model_dir(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 256,
    device: str = "cpu",
    out: str | Path | None = None,
    ranker: bool = True,
) -> dict[str, float]:
    """Metrics of a trained model on a split (percent); also written to ``out`` when given. Read-only on
    ``model_dir``: evaluating never writes into the run folder unless ``out`` points there. ``ranker=False``:
    without the learned ranker (hand-weighted scores)."""
    tm = TrainedModel(model_dir, device, ranker=ranker)
    ds = load_dataset(
        data_dir, tm.meta["format"], label_vocab=tm.label_vocab if tm.meta["format"] == "raw" else None
    )
    if split not in ds.splits:
        raise FileNotFoundError(f"{data_dir}: no {split!r} split")
    if ds.num_labels != len(tm.label_vocab):
        raise ValueError(f"{data_dir}: {ds.num_labels} labels but the model has {len(tm.label_vocab)}")
    part = ds.splits[split]
    col = tm.collator(texts=part.texts, features=part.features, labels=part.labels)
    order = np.argsort([len(t) for t in part.texts], kind="stable") if tm.tokenizer is not None else None
    ids, _ = rank_documents(tm.model, col, len(part), 5, batch_size, tm.device, order=order)
    result = compute_metrics(ids, part.labels, tm.propensities)
    if out is not None and get_rank() == 0:
        atomic_write_json(result, out)
    return result


def predict_lines(
    model_dir: str | Path,
    lines: list[str],
    top_k: int = 5,
    batch_size: int = 256,
    device: str = "cpu",
    ranker: bool = True,
) -> list[list[tuple[str, float]]]:
    """Top-k (label token, score) per input line (raw text, or ``f:v ...`` lines for a BoW model)."""
    tm = TrainedModel(model_dir, device, ranker=ranker)
    if tm.meta["format"] == "bow":
        feats = _parse_bow_lines(lines, tm.meta["num_features"])
        col = tm.collator(features=feats)
    else:
        col = tm.collator(texts=lines)
    ids, scores = rank_documents(tm.model, col, len(lines), top_k, batch_size, tm.device)
    return [
        [(tm.label_vocab[i], float(s)) for i, s in zip(row_ids, row_sc) if i >= 0]
        for row_ids, row_sc in zip(ids, scores)
    ]


def _parse_bow_lines(lines: list[str], num_features: int, source: str = "<stdin>") -> sp.csr_matrix:
    """``f:v f:v ...`` per line. Policy: a line that is not entirely features is refused, naming the line
    and the token (skipping the token would silently rank the document on an emptier vector), except a
    leading label field ``l1,l2`` as in the training files. A line with no feature at all is refused too."""
    rows, cols, vals = [], [], []
    for r, line in enumerate(lines):
        toks = line.split()
        if toks and ":" not in toks[0] and all(t.isdigit() for t in toks[0].split(",")):
            toks = toks[1:]  # the label field of an XC line
        if not toks:
            raise InputFileError(f"{source}:{r + 1}: no features (expected 'index:value ...')")
        for tok in toks:
            k, sep, v = tok.partition(":")
            try:
                if not sep:
                    raise ValueError(tok)
                k_i, v_f = int(k), float(v)
            except ValueError as exc:
                raise InputFileError(
                    f"{source}:{r + 1}: malformed feature {tok!r} (expected index:value)"
                ) from exc
            if not 0 <= k_i < num_features:
                raise InputFileError(
                    f"{source}:{r + 1}: feature index {k_i} out of range [0, {num_features})"
                )
            if not np.isfinite(v_f):
                raise InputFileError(f"{source}:{r + 1}: feature value {tok!r} is not finite")
            rows.append(r)
            cols.append(k_i)
            vals.append(v_f)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(lines), num_features), dtype=np.float32)
