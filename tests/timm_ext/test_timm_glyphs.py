"""Glyph dataset: charsets, builder (blank/duplicate removal, split by font), committed subset, loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from mhe_plugins.datasets.glyphs import (
    TEST_PACKAGES,
    GlyphDataset,
    build_glyph_dataset,
    charset_codepoints,
    load_glyph_split,
    read_classes,
)
from timm_ext.glyph_builder import default_fonts_dir

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT_CACHE = default_fonts_dir()  # the user's Debian font cache (python -m timm_ext.glyph_builder)


def test_gb2312_levels():
    l1, l2 = charset_codepoints("gb2312-1"), charset_codepoints("gb2312-2")
    assert (len(l1), len(l2)) == (3755, 3008)
    assert len(set(l1)) == 3755 and not set(l1) & set(l2)
    assert l1[0] == ord("啊") and l1[-1] == ord("座") and l2[0] == ord("亍")
    assert all(0x4E00 <= c <= 0x9FFF for c in l1 + l2)
    with pytest.raises(ValueError, match="unknown charset"):
        charset_codepoints("big5")


@pytest.fixture()
def latin_fonts(tmp_path):
    """Three 'packages': two train fonts (one an exact copy of the test font) and one test font."""
    root = tmp_path / "fonts"
    for pkg, name in [
        ("pkg-sans", "DejaVuSans.ttf"),
        ("pkg-serif", "DejaVuSerif.ttf"),
        ("pkg-copy", "DejaVuSerif.ttf"),
    ]:
        (root / pkg / "usr").mkdir(parents=True)
        shutil.copy(MPL_FONTS / name, root / pkg / "usr" / name)
    return root


def test_builder_drops_blanks_duplicates_and_splits_by_font(latin_fonts, tmp_path):
    cps = [ord(c) for c in "AB CD"]  # the space is mapped by the fonts but renders blank
    meta = build_glyph_dataset(
        tmp_path / "out", fonts_dir=latin_fonts, codepoints=cps, size=24, test_packages=("pkg-serif",),
        valid_fraction=0.0, workers=1, progress=False,
    )  # fmt: skip
    tr_im, tr_lab, tr_font = load_glyph_split(tmp_path / "out", "train")
    te_im, te_lab, te_font = load_glyph_split(tmp_path / "out", "test")
    assert tr_im.shape[1:] == (24, 24) and tr_im.dtype == np.uint8
    space = cps.index(ord(" "))
    assert space not in tr_lab and space not in te_lab  # blank renders dropped
    assert sorted(te_lab.tolist()) == [0, 1, 3, 4]
    assert set(te_font) == {"pkg-serif:DejaVuSerif.ttf#0"}
    # pkg-copy renders exactly the test font: all its images are removed from train
    assert set(tr_font) == {"pkg-sans:DejaVuSans.ttf#0"}
    assert meta["removed_train_copies_of_test"] == 4
    assert meta["font_packages"] == ["pkg-copy", "pkg-sans", "pkg-serif"] and "fonts_dir" not in meta
    assert read_classes(tmp_path / "out") == list("AB CD")
    test_keys = {(int(lab), im.tobytes()) for im, lab in zip(te_im, te_lab)}
    assert not any((int(lab), im.tobytes()) in test_keys for im, lab in zip(tr_im, tr_lab))


def test_builder_rejects_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_glyph_dataset(tmp_path / "o", fonts_dir=tmp_path / "nope", codepoints=[65], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .ttf"):
        build_glyph_dataset(tmp_path / "o", fonts_dir=tmp_path / "empty", codepoints=[65], progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        build_glyph_dataset(tmp_path / "o", fonts_dir=tmp_path / "empty", num_classes=4000, progress=False)


def test_committed_subset_is_split_by_font():
    classes = read_classes(SUBSET)
    assert len(classes) == 500 and classes[0] == "啊"
    tr_im, tr_lab, tr_font = load_glyph_split(SUBSET, "train")
    va_im, va_lab, va_font = load_glyph_split(SUBSET, "valid")
    te_im, te_lab, te_font = load_glyph_split(SUBSET, "test")
    for lab in (tr_lab, va_lab, te_lab):
        assert lab.min() >= 0 and lab.max() < 500
    assert len(np.unique(tr_lab)) == 500 and len(np.unique(te_lab)) == 500
    test_pkgs = {f.split(":")[0] for f in te_font}
    assert test_pkgs == set(TEST_PACKAGES)
    assert not {f.split(":")[0] for f in np.concatenate([tr_font, va_font])} & set(TEST_PACKAGES)
    # no blank image, no exact copy of a test image in train
    assert (tr_im.reshape(len(tr_im), -1).max(1) > 127).all()
    test_keys = {(int(lab), im.tobytes()) for im, lab in zip(te_im, te_lab)}
    assert not any((int(lab), im.tobytes()) in test_keys for im, lab in zip(tr_im, tr_lab))
    assert len(tr_lab) > 15 * 500  # >= 15 train renderings per class on average


def test_glyph_dataset_with_timm_loader():
    from timm.data import create_loader

    ds = GlyphDataset(SUBSET, "valid", mode="L")
    img, y = ds[3]
    assert img.size == (32, 32) and img.mode == "L" and y == int(ds.targets[3])
    assert ds.filename(3).endswith(ds.classes[y])
    loader = create_loader(
        ds, input_size=(1, 32, 32), batch_size=16, is_training=True, use_prefetcher=False, mean=(0.5,), std=(0.5,),
        hflip=0.0, color_jitter=0.0, scale=(0.6, 1.0), num_workers=0,
    )  # fmt: skip
    x, t = next(iter(loader))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32 and t.dtype == torch.int64
    assert -1.0 <= x.min() < x.max() <= 1.0
    assert GlyphDataset(SUBSET, "valid")[0][0].mode == "RGB"


def test_corrupt_split_file_names_the_file(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "train.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="train.npz"):
        load_glyph_split(tmp_path, "train")
    np.savez(
        tmp_path / "valid.npz",
        images=np.zeros((2, 8, 8), np.uint8),
        labels=np.array([0, 7]),
        fonts=np.array(["f", "f"]),
    )
    with pytest.raises(ValueError, match=r"valid.npz: item 1 has label 7"):
        GlyphDataset(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="test.npz"):
        load_glyph_split(tmp_path, "test")


@pytest.mark.skipif(not (FONT_CACHE / "fonts-cwtex-kai").is_dir(), reason="Debian font cache not present")
def test_real_fonts_render_hanzi(tmp_path):
    pkgs = (*TEST_PACKAGES, "fonts-cwtex-ming", "fonts-cwtex-heib", "fonts-droid-fallback")
    meta = build_glyph_dataset(
        tmp_path / "g", fonts_dir=FONT_CACHE, packages=pkgs, num_classes=5, workers=1, progress=False
    )
    assert meta["splits"]["test"]["classes_present"] == 5
    assert {f.split(":")[0] for f in meta["splits"]["test"]["faces"]} == set(TEST_PACKAGES)
    assert meta["splits"]["train"]["classes_present"] == 5 and meta["splits"]["train"]["images"] >= 5 * 2


def test_cli_builds_and_subsets(latin_fonts, tmp_path):
    from timm_ext.datasets import main

    # Latin fonts render no hanzi: a clear error, not an empty dataset
    with pytest.raises(ValueError, match="no glyph of gb2312-1 rendered for the test split"):
        main(["glyphs", "--out", str(tmp_path / "cjk"), "--fonts-dir", str(latin_fonts), "--num-classes", "3",
              "--workers", "1"])  # fmt: skip
    main(["subset", "--src", str(SUBSET), "--out", str(tmp_path / "s10"), "--num-classes", "10"])
    _, lab, _ = load_glyph_split(tmp_path / "s10", "test")
    assert set(lab.tolist()) == set(range(10)) and read_classes(tmp_path / "s10") == read_classes(SUBSET)[:10]
