"""HF encoder path with a tiny random-weight BERT saved locally (no hub access)."""

import json
import shutil

from xmc.evaluate import TrainedModel, evaluate_model_dir, predict_lines
from xmc.train import TrainConfig, train

from .conftest import tiny_bert as _tiny_bert


def test_hf_encoder_trains_saves_and_reloads_without_the_original_dir(wordnet_small, tmp_path):
    texts = (wordnet_small / "train_texts.txt").read_text().splitlines()
    bert = tmp_path / "bert"
    bert.mkdir()
    _tiny_bert(bert, texts)
    out = tmp_path / "out"
    cfg = TrainConfig(
        data_dir=str(wordnet_small),
        output=str(out),
        encoder="hf",
        model_path=str(bert),
        head="mhc",
        epochs=1,
        max_steps=15,
        batch_size=32,
        max_len=32,
        feature_layers=5,
        threads=1,
        progress=False,
        lr=1e-3,
    )
    summary = train(cfg)
    assert summary["steps"] == 15
    meta = json.loads((out / "config.json").read_text())
    # 2 layers + embeddings = 3 hidden states available, so k=5 is clamped to 3 -> 3 * 32 features
    tm = TrainedModel(out)
    assert tm.model.encoder.out_features == 96 and meta["model"]["encoder"] == "hf"
    shutil.rmtree(bert)  # eval / predict need only the output dir
    res = evaluate_model_dir(out, wordnet_small, "test")
    assert 0 <= res["P@1"] <= 100
    rows = predict_lines(out, ["a small hound"], top_k=3)
    assert len(rows[0]) == 3
