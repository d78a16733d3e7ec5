"""RecordIO float labels are checked, never truncated (1.5 -> 1 and -0.5 -> 0 trained on the wrong identity)."""

from __future__ import annotations

import numpy as np
import pytest

from insightface_ext.data import RecordFaceDataset
from insightface_ext.recordio import IRHeader, RecordIOWriter, pack, pack_img, write_face_rec


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _plain_rec(root, labels) -> None:
    """An im2rec-style file: every record is an image with a scalar float label."""
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key, lab in enumerate(labels):
            w.write_idx(key, pack_img(IRHeader(0, lab, key, 0), _img(key), img_fmt=".png"))


@pytest.mark.parametrize("bad", [1.5, -0.5, -1.0, float("nan"), float("inf")])
def test_plain_rec_bad_label_names_file_record_and_value(tmp_path, bad):
    _plain_rec(tmp_path, [0.0, 1.0, bad, 2.0])
    with pytest.raises(ValueError, match=rf"train\.rec: record 2 .*label {bad!r}"):
        RecordFaceDataset(tmp_path)


def test_insightface_layout_bad_image_label(tmp_path):
    write_face_rec(tmp_path, [(_img(0), 0), (_img(1), 1)], img_fmt=".png")
    # rewrite image record 2 with a fractional label, same layout otherwise
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, np.array([3, 5], "f4"), 0, 0), b""))
        w.write_idx(1, pack_img(IRHeader(0, 0.0, 1, 0), _img(0), img_fmt=".png"))
        w.write_idx(2, pack_img(IRHeader(0, 1.5, 2, 0), _img(1), img_fmt=".png"))
        w.write_idx(3, pack(IRHeader(2, np.array([1, 2], "f4"), 3, 0), b""))
        w.write_idx(4, pack(IRHeader(2, np.array([2, 3], "f4"), 4, 0), b""))
    ds = RecordFaceDataset(tmp_path)
    assert ds[0][1] == 0
    with pytest.raises(ValueError, match=r"train\.rec: record 2 .*label 1\.5"):
        ds[1]


def test_header_identity_range_must_be_integers(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, np.array([2.5, 4], "f4"), 0, 0), b""))
        w.write_idx(1, pack_img(IRHeader(0, 0.0, 1, 0), _img(0), img_fmt=".png"))
    with pytest.raises(ValueError, match=r"train\.rec: header record 0 .*2\.5"):
        RecordFaceDataset(tmp_path)


def test_writer_refuses_fractional_identity(tmp_path):
    with pytest.raises(ValueError, match=r"sample 1: identity label 1\.5"):
        write_face_rec(tmp_path, [(_img(0), 0), (_img(1), 1.5)], img_fmt=".png")


def test_integer_float_labels_still_work(tmp_path):
    _plain_rec(tmp_path, [0.0, 2.0, 1.0])
    ds = RecordFaceDataset(tmp_path)
    assert ds.num_classes == 3 and [ds[i][1] for i in range(3)] == [0, 2, 1]
