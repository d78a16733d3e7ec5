"""A trained model folder is refused when its files disagree, and BoW predict input is checked per line."""

import io
import json

import numpy as np
import pytest

from xmc.cli import main
from xmc.evaluate import TrainedModel, predict_lines
from xmc.io import InputFileError
from xmc.train import TrainConfig, train


@pytest.fixture(scope="module")
def bow_model(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("bow")
    lines = []
    for _ in range(120):
        lab = int(rng.integers(0, 20))
        lines.append(f"{lab} {2 * lab}:1.0 {2 * lab + 1}:0.5")
    (data / "train.txt").write_text("120 40 20\n" + "\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("model")
    train(TrainConfig(data_dir=str(data), output=str(out), epochs=1, threads=1, progress=False, tfidf_dim=16))
    return out


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_short_labels_file_is_refused(bow_model, tmp_path):
    d = _copy(bow_model, tmp_path / "m")
    lines = (d / "labels.txt").read_text().splitlines()
    (d / "labels.txt").write_text("".join(t + "\n" for t in lines[:-5]))
    with pytest.raises(
        InputFileError, match=r"labels.txt: has 15 lines but .*config.json says num_labels=20"
    ):
        TrainedModel(d)
    (d / "labels.txt").write_text("".join(t + "\n" for t in lines[:-1] + [lines[0]]))
    with pytest.raises(InputFileError, match=r"labels.txt:20: label '0' repeats line 1"):
        TrainedModel(d)


def test_config_json_type_errors_name_the_file_key_and_value(bow_model, tmp_path):
    d = _copy(bow_model, tmp_path / "m")
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "num_labels": "20"}))
    with pytest.raises(InputFileError, match=r"config.json: 'num_labels' must be int, got '20'"):
        TrainedModel(d)
    (d / "config.json").write_text('{\n "format": "bow",\n "num_labels": 20,,\n}')
    with pytest.raises(InputFileError, match=r"config.json:3: not valid JSON"):
        TrainedModel(d)


def test_bow_predict_refuses_tokens_without_colon_and_empty_lines(bow_model, capsys, monkeypatch):
    assert predict_lines(bow_model, ["3 6:1 7:0.5"], top_k=1)[0][0][0] == "3"  # leading label field ok
    with pytest.raises(
        InputFileError, match=r"<stdin>:2: malformed feature 'seven' \(expected index:value\)"
    ):
        predict_lines(bow_model, ["6:1", "6:1 seven 7:1"], top_k=1)
    with pytest.raises(InputFileError, match=r"<stdin>:1: no features"):
        predict_lines(bow_model, [""], top_k=1)
    with pytest.raises(InputFileError, match=r"<stdin>:1: feature value '6:nan' is not finite"):
        predict_lines(bow_model, ["6:nan"], top_k=1)
    monkeypatch.setattr("sys.stdin", io.StringIO("6:1.0 7:1.0\n8:1 x\n"))
    with pytest.raises(InputFileError, match=r"<stdin>:2: malformed feature 'x'"):
        main(["predict", "--model", str(bow_model), "--top-k", "2"])
    assert capsys.readouterr().out == ""  # nothing printed before the whole input was checked
