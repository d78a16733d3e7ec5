"""Raw-format texts/labels split only at "\\n": a stray CR or a mid-file BOM is an error naming file:line
(they used to split a document in two or invent a label, silently)."""

from __future__ import annotations

import lzma

import pytest

from xmc.data import load_dataset, read_raw_split
from xmc.datasets import write_raw_dataset
from xmc.evaluate import read_label_vocab
from xmc.io import InputFileError, read_lines


def _raw(d, texts: str, labels: str, compress: bool = False) -> None:
    for kind, text in (("texts", texts), ("labels", labels)):
        data = text.encode("utf-8")
        if compress:
            (d / f"train_{kind}.txt.xz").write_bytes(lzma.compress(data))
        else:
            (d / f"train_{kind}.txt").write_bytes(data)


def test_mid_file_bom_in_labels_is_an_error(tmp_path):
    # two label files concatenated: the second file's BOM used to become part of label "\ufeffz"
    _raw(tmp_path, "a\nb\nc\n", "\ufeffx y\ny\n\ufeffz\n")
    with pytest.raises(InputFileError, match=r"train_labels\.txt:3: byte-order mark"):
        read_raw_split(tmp_path, "train")


@pytest.mark.parametrize("compress", [False, True])
def test_lone_carriage_return_is_an_error_naming_the_line(tmp_path, compress):
    # one CR in each file: both had 3 "lines", so the counts matched and documents and labels shifted
    _raw(tmp_path, "doc one\rstill doc one\ndoc two\n", "x\ny\rz\n", compress)
    with pytest.raises(InputFileError, match=r"train_texts\.txt(\.xz)?:1: carriage return"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("sep", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_other_unicode_line_breaks_stay_inside_the_line(tmp_path, sep):
    _raw(tmp_path, f"doc{sep}one\ndoc two\n", "x\ny\n")
    texts, labels = read_raw_split(tmp_path, "train")
    assert texts == [f"doc{sep}one", "doc two"] and labels == [["x"], ["y"]]


def test_crlf_and_leading_bom_are_fine(tmp_path):
    _raw(tmp_path, "\ufeffa b\r\nc\r\n", "\ufeffx y\r\ny\r\n")
    assert read_raw_split(tmp_path, "train") == (["a b", "c"], [["x", "y"], ["y"]])
    assert read_lines(tmp_path / "train_texts.txt") == ["a b", "c"]


def test_model_label_vocab_uses_the_same_rules(tmp_path):
    (tmp_path / "labels.txt").write_bytes(b"a\nb\rc\n")
    with pytest.raises(InputFileError, match=r"labels\.txt:2: carriage return"):
        read_label_vocab(tmp_path / "labels.txt", 2, tmp_path / "config.json")


def test_writer_refuses_a_line_break_inside_a_document(tmp_path):
    with pytest.raises(ValueError, match=r"train_texts\.txt: row 2 .*'\\r'"):
        write_raw_dataset({"train": [("ok", ["x"]), ("bad\rdoc", ["y"])]}, tmp_path / "out")
