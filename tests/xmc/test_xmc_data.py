"""Readers: raw text and XC BoW formats, error messages naming file/line/value, validation slice."""

import lzma

import numpy as np
import pytest

from xmc.data import DataFormatError, load_dataset, read_bow_file
from xmc.io import InputFileError
from xmc.train import TrainConfig, train

from .conftest import write_raw


def test_raw_roundtrip_compressed_and_vocab(tmp_path):
    write_raw(tmp_path, "train", ["a b", "c", "d e"], [["x", "y"], [], ["y"]])
    (tmp_path / "test_texts.txt.xz").write_bytes(lzma.compress(b"f\ng\n"))
    (tmp_path / "test_labels.txt.xz").write_bytes(lzma.compress(b"z y\nx\n"))
    ds = load_dataset(tmp_path, valid_size=1, seed=3)
    assert ds.format == "raw" and ds.label_vocab == ["x", "y", "z"]
    assert len(ds.splits["train"]) == 2 and len(ds.splits["valid"]) == 1  # seeded slice of train
    assert ds.splits["test"].texts == ["f", "g"]
    assert [list(r) for r in ds.splits["test"].label_lists()] == [[1, 2], [0]]
    ds2 = load_dataset(tmp_path, valid_size=1, seed=3)
    assert ds2.splits["valid"].texts == ds.splits["valid"].texts  # deterministic


def test_raw_line_count_mismatch_names_files_and_line(tmp_path):
    (tmp_path / "train_texts.txt").write_text("a\nb\nc\n")
    (tmp_path / "train_labels.txt").write_text("x\ny\n")
    with pytest.raises(
        DataFormatError, match=r"train_labels.txt: has 2 lines but .*train_texts.txt has 3; line 3"
    ):
        load_dataset(tmp_path)


def test_raw_missing_partner(tmp_path):
    (tmp_path / "train_texts.txt").write_text("a\n")
    with pytest.raises(DataFormatError, match="without its partner"):
        load_dataset(tmp_path)


def _bow(tmp_path, body: str, name="train.txt"):
    p = tmp_path / name
    p.write_text(body)
    return p


def test_bow_reader_with_empty_label_line(tmp_path):
    p = _bow(tmp_path, "3 5 4\n0,2 0:1.0 3:0.5\n 1:2.0\n3 4:1\n")
    x, y, n_labels = read_bow_file(p)
    assert n_labels == 4 and x.shape == (3, 5)
    assert y == [(0.0, 2.0), (), (3.0,)]
    np.testing.assert_allclose(x.toarray()[0], [1, 0, 0, 0.5, 0])
    ds = load_dataset(tmp_path, valid_size=1)
    assert ds.format == "bow" and ds.num_labels == 4 and ds.num_features == 5


@pytest.mark.parametrize(
    "body, message",
    [
        ("3 5\n0 1:1\n", r"train.txt:1: malformed header '3 5'"),
        ("2 5 4\n0 1:1\n0,7 2:1\n", r"train.txt:3: label id 7 out of range \[0, 4\)"),
        ("2 5 4\n0 1:1\n1 2:x\n", r"train.txt:3: malformed feature '2:x'"),
        ("2 5 4\n0 9:1\n1 2:1\n", r"train.txt:2: feature index 9 out of range \[0, 5\)"),
        ("3 5 4\n0 1:1\n1 2:1\n", r"train.txt:1: header says 3 points but the file has 2"),
    ],
)
def test_bow_errors_name_file_line_and_value(tmp_path, body, message):
    _bow(tmp_path, body)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(tmp_path)


def test_nothing_is_written_when_data_is_bad(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _bow(data, "2 5 4\n0 1:1\n0,7 2:1\n")
    out = tmp_path / "out"
    with pytest.raises(DataFormatError):
        train(TrainConfig(data_dir=str(data), output=str(out), epochs=1, progress=False))
    assert not out.exists()


# ----------------------------------------------------------------------------- issue 14: no silent corruption
@pytest.mark.parametrize("bad", ["1.5", "2.9", "-1"])
def test_bow_fractional_or_negative_label_is_refused(tmp_path, bad):
    _bow(tmp_path, f"2 5 4\n0 1:1\n0,{bad} 2:1\n")
    with pytest.raises(DataFormatError, match=rf"train.txt:3: label '{bad}' is not a non-negative integer"):
        load_dataset(tmp_path)


def test_bow_error_line_numbers_count_blank_and_comment_lines(tmp_path):
    _bow(tmp_path, "2 5 4\n\n# a comment\n0 1:1\n\n0,7 2:1\n")
    with pytest.raises(DataFormatError, match=r"train.txt:6: label id 7 out of range \[0, 4\)"):
        load_dataset(tmp_path)


def test_bow_nan_and_inf_features_are_refused_with_line(tmp_path):
    _bow(tmp_path, "3 5 4\n0 1:1\n1 2:0.5\n2 0:1 3:inf\n")
    with pytest.raises(DataFormatError, match=r"train.txt:4: feature value '3:inf' is not finite"):
        load_dataset(tmp_path)
    _bow(tmp_path, "2 5 4\n0 1:nan\n1 2:0.5\n")
    with pytest.raises(DataFormatError, match=r"train.txt:2: feature value '1:nan' is not finite"):
        load_dataset(tmp_path)


def test_utf8_bom_is_stripped_not_a_phantom_label(tmp_path):
    (tmp_path / "train_texts.txt").write_bytes("\ufeffa b\nc\n".encode())
    (tmp_path / "train_labels.txt").write_bytes("\ufeffx y\ny\n".encode())
    ds = load_dataset(tmp_path, valid_size=1, seed=0)
    assert ds.label_vocab == ["x", "y"]
    assert sorted(ds.splits["train"].texts + ds.splits["valid"].texts) == ["a b", "c"]
    bow = tmp_path / "bow"
    bow.mkdir()
    (bow / "train.txt").write_bytes(b"\xef\xbb\xbf2 5 4\n0 1:1\n3 2:1\n")
    x, y, n = read_bow_file(bow / "train.txt")
    assert n == 4 and y == [(0.0,), (3.0,)]


def test_non_utf8_text_names_file_line_and_bytes(tmp_path):
    (tmp_path / "train_texts.txt").write_bytes(b"fine\nbad \xff\xfe here\n")
    (tmp_path / "train_labels.txt").write_text("x\ny\n")
    with pytest.raises(InputFileError, match=r"train_texts.txt:2: not UTF-8 text \(bytes b'\\xff"):
        load_dataset(tmp_path)


def test_corrupt_xz_names_the_file(tmp_path):
    good = lzma.compress(b"".join(b"line %d\n" % i for i in range(5000)))
    (tmp_path / "train_texts.txt.xz").write_bytes(good[: len(good) // 2])  # truncated download
    (tmp_path / "train_labels.txt").write_text("x\n" * 5000)
    with pytest.raises(InputFileError, match=r"train_texts.txt.xz:\d+: cannot decompress"):
        load_dataset(tmp_path)
    bow = tmp_path / "bow"
    bow.mkdir()
    (bow / "train.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(InputFileError, match=r"train.txt.xz: cannot decompress \(LZMAError"):
        read_bow_file(bow / "train.txt.xz")


def test_config_type_errors_name_field_and_value(tmp_path):
    with pytest.raises(TypeError, match=r"TrainConfig.epochs must be int, got '5' \(str\)"):
        TrainConfig(data_dir="d", output="o", epochs="5")
    with pytest.raises(TypeError, match=r"TrainConfig.swa must be bool, got 1 \(int\)"):
        TrainConfig(data_dir="d", output="o", swa=1)
    with pytest.raises(ValueError, match=r"TrainConfig.candidate_loss: 'ce' is not one of"):
        TrainConfig(data_dir="d", output="o", candidate_loss="ce")
    assert TrainConfig(data_dir="d", output="o", lr=1).lr == 1  # an int where a float is expected is fine
