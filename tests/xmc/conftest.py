"""Shared fixtures: a small slice of the bundled WordNet-XMC (real data) in raw and BoW format."""

from pathlib import Path

import numpy as np
import pytest

from xmc.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
WORDNET = REPO / "data" / "wordnet_xmc"


def write_raw(d: Path, split: str, texts, labels) -> None:
    (d / f"{split}_texts.txt").write_text("".join(t + "\n" for t in texts))
    (d / f"{split}_labels.txt").write_text("".join(" ".join(ls) + "\n" for ls in labels))


@pytest.fixture(autouse=True, scope="session")
def tfidf_unless_asked():
    """``--encoder auto`` means TF-IDF only in these tests (in process), whatever ``xmc.config.AUTO_ENCODER``
    says: they test the trainer, not the MiniLM (whose rows have their own tests, which set what they need;
    the auto rule itself: test_xmc_issue28.py). Session-scoped so that it also holds in module-scoped
    fixtures and after a test's ``monkeypatch.undo()``. Subprocess tests pass ``--encoder tfidf``."""
    import xmc.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xmc.config, "AUTO_ENCODER", "tfidf")
        yield


@pytest.fixture(scope="session")
def wordnet_small(tmp_path_factory) -> Path:
    """2,400 train / 300 valid / 300 test documents restricted to frequent labels (real WordNet text)."""
    ds = load_dataset(WORDNET)
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("wn_small")
    tr = ds.splits["train"]
    counts = np.asarray(tr.labels.sum(0)).ravel()
    keep = set(np.argsort(-counts)[:300].tolist())  # 300 most frequent labels
    for split, n in (("train", 2400), ("valid", 300), ("test", 300)):
        part = ds.splits[split]
        lists = part.label_lists()
        rows = [i for i in rng.permutation(len(part)) if set(lists[i].tolist()) & keep][:n]
        texts = [part.texts[i] for i in rows]
        labels = [[ds.label_vocab[j] for j in lists[i] if j in keep] for i in rows]
        write_raw(out, split, texts, labels)
    return out


def tiny_bert(path, texts):
    """A tiny random-weight BERT (2 layers, 32-d) and its tokenizer saved in ``path`` (no hub access)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in t.lower().replace(";", " ").replace(",", " ").split()})[:800]
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=805,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
