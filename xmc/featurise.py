"""Per-split encoder inputs of a training run (TF-IDF matrices, token ids, cached transformer embeddings) and
the static files of its output folder (config, labels, TF-IDF vocabulary, tokenizer), with the resume check
that they match."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mhe_plugins.training import atomic_write, atomic_write_json, atomic_write_text
from xmc.batching import Collator
from xmc.config import TrainConfig
from xmc.data import XMCDataset
from xmc.encoders import TfidfFeaturizer, l2_rows, load_tokenizer
from xmc.io import read_lines
from xmc.model import XMCModel


class Featurised:
    """Per-split encoder inputs, computed once: TF-IDF matrices, the transformer's token ids (fine-tuning) or
    its cached embeddings (frozen), and the saved featurizer state."""

    def __init__(self, cfg: TrainConfig, ds: XMCDataset, out: Path, say=print):
        self.tokenizer = self.featurizer = None
        self.features: dict = {}
        self.token_ids: dict = {}
        self.embeddings: dict = {}
        self.embed_s = 0.0  # seconds the embeddings took to compute (also when reused from the cache)
        self.embed_reused = False
        self.num_features = ds.num_features
        if cfg.sparse_input():
            if ds.format == "raw":
                path = out / "tfidf.json"
                if cfg.resume and path.exists():
                    self.featurizer = TfidfFeaturizer.load(path)
                else:
                    self.featurizer = TfidfFeaturizer(
                        max_features=cfg.max_features, ngram_max=cfg.ngram_max
                    ).fit(ds.splits["train"].texts)
                self.num_features = self.featurizer.num_features
                self.features = {s: self.featurizer.transform(p.texts) for s, p in ds.splits.items()}
            else:
                if cfg.ngram_max != 1:
                    raise ValueError("--ngram-max needs raw text: BoW files come with their own features")
                self.features = {s: l2_rows(p.features) for s, p in ds.splits.items()}
        if cfg.encoder != "tfidf":
            if ds.format != "raw":
                raise ValueError(
                    f"--encoder {cfg.encoder} needs raw text (format raw); BoW files only work with "
                    "--encoder tfidf"
                )
            self.tokenizer = load_tokenizer(cfg.model_path)
            if cfg.frozen():
                self._cached_embeddings(cfg, ds, say)
            else:  # tokenized once; batches are padded per batch (length-bucketed in training)
                for s, p in ds.splits.items():
                    self.token_ids[s] = self.tokenizer(p.texts, truncation=True, max_length=cfg.max_len)[
                        "input_ids"
                    ]

    def _cached_embeddings(self, cfg: TrainConfig, ds: XMCDataset, say) -> None:
        from xmc.embcache import EmbeddingCache, cache_key, dataset_fingerprint, embed_texts
        from xmc.encoders import HFEncoder

        cache = EmbeddingCache(cfg.embedding_cache, say=say)
        files = dataset_fingerprint(cfg.data_dir)
        encoder = None
        reused = []
        for s, p in ds.splits.items():
            pool = cfg.resolved_pooling()  # the LightXML feature also depends on its number of layers
            pool = f"{pool}-{cfg.feature_layers}" if pool == "lightxml" else pool
            key = cache_key(cfg.model_path, pool, cfg.max_len, files, s, p.texts)

            def compute(texts=p.texts):
                nonlocal encoder
                if encoder is None:
                    encoder = HFEncoder(
                        cfg.model_path, cfg.feature_layers, 0.0, pooling=cfg.resolved_pooling(),
                        freeze_layers=10**6,
                    )  # fmt: skip
                return embed_texts(encoder, self.tokenizer, texts, cfg.max_len, batch_size=128)

            arr, meta = cache.get_or_compute(key, compute, data_dir=str(Path(cfg.data_dir).resolve()))
            self.embeddings[s] = arr
            self.embed_s += float(meta.get("compute_s", 0.0))
            reused.append(meta["reused"])
        self.embed_reused = all(reused)

    def collator(self, ds: XMCDataset, split: str, max_len: int) -> Collator:
        part = ds.splits[split]
        return Collator(
            part.labels,
            self.features.get(split),
            part.texts,
            self.tokenizer,
            max_len,
            token_ids=self.token_ids.get(split),
            embeddings=self.embeddings.get(split),
            tokens=split in self.token_ids,
        )


def write_static_files(
    cfg: TrainConfig, ds: XMCDataset, feats: Featurised, model: XMCModel, out: Path, prop
) -> None:
    meta = {
        "format": ds.format,
        "num_labels": ds.num_labels,
        "num_features": feats.num_features,
        "model": model.cfg,
        "train_config": asdict(cfg),
        "classifier_parameters": model.head.classifier_parameters(),
        "head_resolved": {
            k: getattr(model.head, k, None)
            for k in ("num_groups", "group_size", "candidates_topk", "hidden_dim")
        },
    }
    if cfg.encoder != "tfidf":
        hf = model.encoder.hf if cfg.encoder == "hybrid" else model.encoder
        hf.model.config.save_pretrained(out / "encoder")
        feats.tokenizer.save_pretrained(out / "encoder")
    if feats.featurizer is not None:
        feats.featurizer.save(out / "tfidf.json")
    atomic_write_text("".join(t + "\n" for t in ds.label_vocab), out / "labels.txt")
    atomic_write(out / "propensities.npy", lambda fh: np.save(fh, prop.astype(np.float32)))
    atomic_write_json(meta, out / "config.json")


def check_resume_matches(out: Path, ds: XMCDataset, feats: Featurised, model: XMCModel) -> None:
    """On ``--resume``, the data and model must be the run's own: labels by name and order, the feature
    space and the model config. Checked before any file is written; a mismatch names the first difference."""
    labels_file = out / "labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"cannot resume: {labels_file} is missing (the run's label names)")
    saved = read_lines(labels_file)
    if saved != list(ds.label_vocab):
        where = next((i for i, (a, b) in enumerate(zip(saved, ds.label_vocab)) if a != b), None)
        detail = (
            f"{len(saved)} labels in the run, {len(ds.label_vocab)} in the data"
            if where is None
            else f"{labels_file.name}:{where + 1} is {saved[where]!r}, the data's label {where + 1} is "
            f"{ds.label_vocab[where]!r}"
        )
        raise ValueError(f"cannot resume {out} on this dataset: its labels differ ({detail})")
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key, now in (("num_features", feats.num_features), ("model", model.cfg), ("format", ds.format)):
        if meta.get(key) != json.loads(json.dumps(now)):
            raise ValueError(
                f"cannot resume {out}: config.json has {key}={meta.get(key)!r}, this run would use {now!r}"
            )
