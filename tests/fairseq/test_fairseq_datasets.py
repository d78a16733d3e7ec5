"""DDTP / LibreOffice corpus builder on the committed real-format sample (no fairseq needed)."""

from __future__ import annotations

import glob
import re
import tarfile
from pathlib import Path

import pytest

from fairseq_ext.datasets import build, corpus, debian, libreoffice
from fairseq_ext.datasets.__main__ import main as datasets_main

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "ddtp_sample"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddtp_sources")
    with tarfile.open(SAMPLE / "sources.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return root


def _recipe_pairs(lists: Path) -> set[tuple[str, str]]:
    """Independent re-implementation (the documented one-liner recipe) to cross-check the parser."""

    def load(lang):
        txt = Path(glob.glob(str(lists / f"*Translation-{lang}"))[0]).read_text()
        recs = (
            dict(re.findall(r"^(Description-md5|Description-\w+): ?(.*(?:\n .*)*)", r, re.M))
            for r in txt.split("\n\n")
        )
        return {
            r["Description-md5"]: [
                p.replace("\n ", " ").strip()
                for p in re.split(r"\n \.(?=\n|$)", v.replace("\n", " \n .\n", 1))
                if p.strip()
            ]
            for r in recs
            if "Description-md5" in r
            for k, v in r.items()
            if k.startswith("Description-") and k != "Description-md5"
        }

    en, de = load("en"), load("de")
    norm = " ".join
    return {
        (norm(s.split()), norm(t.split()))
        for k in de.keys() & en.keys()
        if len(en[k]) == len(de[k])
        for s, t in zip(en[k], de[k])
        if s != t
    }


def test_ddtp_parser_matches_independent_recount(sources):
    maps = [
        debian.parse_translation(debian.read_text(debian.find_translation_file(sources / "lists", lang)))
        for lang in ("en", "de")
    ]
    mine = set(debian.ddtp_pairs(*maps))
    assert len(mine) > 300
    assert mine == _recipe_pairs(sources / "lists")


def test_paragraph_split_and_bad_record_error():
    text = (
        "Package: a\nDescription-md5: " + "0" * 32 + "\nDescription-en: short text\n line one\n"
        " continues\n .\n second para\n\nPackage: b\nDescription-md5: xyz\nDescription-en: s\n"
    )
    with pytest.raises(ValueError, match=r"Translation-en:9: bad Description-md5 'xyz'"):
        debian.parse_translation(text, "Translation-en")
    ok = debian.parse_translation(text.split("\n\nPackage: b")[0], "t")
    assert ok == {"0" * 32: ["short text", "line one continues", "second para"]}


def test_help_page_drops_hidden_variants_keeps_default():
    page = (
        '<p id="par_id1" class="x">Choose <span hidden="true" id="MACtext_1"><span>LibreOffice - Preferences'
        '</span></span><span hidden="true" id="defaulttext_1"><span>Tools - Options</span></span> - Load</p>'
        '<h2 id="hd_id2">Head&amp;ing</h2><p id="other">not aligned</p>'
    )
    assert libreoffice.parse_help_page(page) == {
        "par_id1": "Choose Tools - Options - Load",
        "hd_id2": "Head&ing",
    }


def test_build_on_sample(sources, tmp_path):
    stats = build(
        tmp_path / "c",
        apt_lists=sources / "lists",
        cache=sources,
        fetch=False,
        vocab_sizes=(400,),
        n_valid=30,
        n_test=40,
    )
    assert stats["unique_pairs_per_source"]["ddtp"] == len(_recipe_pairs(sources / "lists"))
    assert stats["raw_pairs_per_source"]["lo-help"] > 300 and stats["raw_pairs_per_source"]["lo-ui"] > 40
    raw = tmp_path / "c" / "raw"
    split = {
        s: list(zip(*(p.read_text().splitlines() for p in (raw / f"{s}.en", raw / f"{s}.de"))))
        for s in corpus.SPLITS
    }
    assert len({s for s, _ in split["test"]}) == 40 and len({s for s, _ in split["valid"]}) == 30
    train_src = {s for s, _ in split["train"]}
    assert not train_src & {s for s, _ in split["test"]} and not train_src & {s for s, _ in split["valid"]}
    everything = [p for ps in split.values() for p in ps]
    assert len(everything) == len(set(everything)) == stats["pairs"]
    # BPE pieces decode back to the raw text (sentencepiece round trip, modulo its NFKC normalisation)
    import unicodedata

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "c" / "spm400.model"))
    pieces = (tmp_path / "c" / "bpe400" / "test.de").read_text().splitlines()
    assert [sp.decode(p.split()) for p in pieces] == [
        unicodedata.normalize("NFKC", t) for _, t in split["test"]
    ]


def test_cli_errors(sources, tmp_path):
    with pytest.raises(SystemExit):
        datasets_main(["ddtp", "--langs", "en", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="Translation-xx"):
        datasets_main(
            ["ddtp", "--out", str(tmp_path), "--apt-lists", str(tmp_path), "--no-fetch", "--sources", "ddtp"]
        )
    with pytest.raises(ValueError, match="unknown source"):
        datasets_main(["ddtp", "--out", str(tmp_path), "--no-fetch", "--sources", "wiki"])


def test_sample_builder_errors_name_the_files(tmp_path):
    import gzip

    from fairseq_ext.datasets.sample import build_sample

    with pytest.raises(FileNotFoundError, match=r"missing train\.en\.gz, train\.de\.gz"):
        build_sample(tmp_path / "out", sample=tmp_path, binarize=False)
    for split in ("train", "valid", "test"):
        for lang, n in (("en", 3), ("de", 2 if split == "valid" else 3)):
            with gzip.open(tmp_path / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(f"line {i}\n" for i in range(n)))
    with pytest.raises(ValueError, match=r"valid has different line counts per language \[2, 3\]"):
        build_sample(tmp_path / "out", sample=tmp_path, binarize=False)
