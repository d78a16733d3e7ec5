"""WordNet-XMC builder: hypernym closure, label filtering, split, errors; and the bundled copy."""

import json

import pytest

from xmc.data import load_dataset
from xmc.datasets import build_wordnet_xmc, main

from .conftest import WORDNET


def _line(off, lemma, hyps, gloss, pos="n"):
    ptrs = " ".join(f"@ {h} {pos} 0000" for h in hyps)
    return f"{off} 03 {pos} 01 {lemma} 0 {len(hyps):03d} {ptrs} | {gloss}  \n".replace("  |", " |")


def _write_wordnet(d):
    header = "  1 This software and database is being provided to you\n  2 licence text\n"
    noun = [
        _line("00000001", "entity", [], "that which exists"),
        _line("00000002", "animal", ["00000001"], "a living organism"),
        _line("00000003", "dog", ["00000002"], "a domestic canid"),
        _line("00000004", "puppy", ["00000003"], "a young dog"),
        _line("00000005", "beagle", ["00000003"], "a small hound"),
        _line("00000006", "rock", ["00000001"], "a lump of stone"),
    ]
    (d / "data.noun").write_text(header + "".join(noun))
    verb = _line("00000007", "bark", [], "make a barking sound", pos="v")
    verb = verb.replace(" | ", " 01 + 02 00 | ")  # verb frames follow the pointers
    (d / "data.verb").write_text(header + verb)


def test_closure_filtering_and_split(tmp_path):
    _write_wordnet(tmp_path)
    splits, stats = build_wordnet_xmc(tmp_path, drop_top=1, min_docs=2, seed=0, fractions=(0.5, 0.25, 0.25))
    docs = dict((t.split(";")[0], ls) for rows in splits.values() for t, ls in rows)
    # entity (5 docs) is the most frequent label and is dropped; rock/animal/bark have no label left
    assert stats["dropped_top_labels"] == ["entity.n.00000001"]
    assert docs == {
        "dog": ["animal.n.00000002"],
        "puppy": ["animal.n.00000002", "dog.n.00000003"],  # transitive ancestors
        "beagle": ["animal.n.00000002", "dog.n.00000003"],
    }
    assert stats["labels"] == 2 and stats["documents"] == 3
    assert sum(stats["splits"].values()) == 3


def test_malformed_line_names_file_and_line(tmp_path):
    _write_wordnet(tmp_path)
    with open(tmp_path / "data.noun", "a") as fh:
        fh.write("00000009 03 n 01 broken 0 002 @ 00000001 n 0000 | too few pointers\n")
    with pytest.raises(ValueError, match=r"data.noun:9: malformed synset line"):
        build_wordnet_xmc(tmp_path)


def test_missing_wordnet_dir_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        build_wordnet_xmc(tmp_path)


def test_cli_writes_raw_dataset_and_refuses_to_clobber(tmp_path):
    _write_wordnet(tmp_path)
    out = tmp_path / "out"
    main(
        ["wordnet", "--wordnet-dir", str(tmp_path), "--out", str(out), "--drop-top", "1", "--compress", "xz"]
    )
    ds = load_dataset(out, valid_size=1)
    assert ds.label_vocab == ["animal.n.00000002", "dog.n.00000003"]
    with pytest.raises(FileExistsError):
        main(["wordnet", "--wordnet-dir", str(tmp_path), "--out", str(out)])


def test_bundled_copy_matches_its_stats():
    stats = json.loads((WORDNET / "stats.json").read_text())
    ds = load_dataset(WORDNET)
    assert {s: len(p) for s, p in ds.splits.items()} == stats["splits"]
    assert ds.num_labels == stats["labels"] == 13723
    assert 90_000 < stats["documents"] < 100_000 and 5 < stats["labels_per_doc"] < 7
    per_label = (
        ds.splits["train"].labels.sum(0) + ds.splits["valid"].labels.sum(0) + ds.splits["test"].labels.sum(0)
    )
    assert per_label.min() >= 2  # every label has >= 2 documents
