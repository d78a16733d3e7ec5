"""Reading untrusted files: verification .bin without code execution, RecordIO errors naming file and offset."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from insightface_ext.data import RecordFaceDataset
from insightface_ext.recordio import IRHeader, RecordIOError, RecordIOWriter, pack, pack_img
from insightface_ext.verification import load_bin, write_bin


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_malicious_bin_runs_nothing_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([b"x", _Evil(marker)], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"lfw\.bin: refuses to load posix\.system"):
        load_bin(path)
    assert not marker.exists()
    # sanity: the file really is an exploit under a plain pickle.load
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_legit_bins_still_load(tmp_path, protocol, as_numpy):
    imgs = _png_images(4)
    write_bin(tmp_path / "ref.bin", imgs, [True, False])  # our writer: list of bytes + list of bools
    bins, _ = pickle.loads((tmp_path / "ref.bin").read_bytes())
    issame = np.array([True, False]) if as_numpy else [True, False]
    if as_numpy:
        bins = [bytearray(b) for b in bins]  # some insightface bins hold bytearrays / numpy arrays
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    images, same = load_bin(path)
    assert images.shape == (4, 8, 8, 3) and np.array_equal(images, np.stack(imgs))
    assert same.dtype == bool and same.tolist() == [True, False]


def _rec(tmp_path, header_labels, images_keys=(1, 2), broken: dict | None = None):
    """A tiny insightface-layout .rec: header record 0, image records; ``broken`` = {key: raw bytes}."""
    root = tmp_path / "rec"
    broken = broken or {}
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(len(header_labels), np.array(header_labels, "f4"), 0, 0), b""))
        for k in images_keys:
            rec = broken.get(k) or pack_img(IRHeader(0, 0.0, k, 0), _png_images(1)[0], img_fmt=".png")
            w.write_idx(k, rec)
    return root


def test_recordio_errors_name_file_and_offset(tmp_path):
    root = _rec(tmp_path / "a", [3, 4])
    assert len(RecordFaceDataset(root)) == 2
    # header announcing image records that the .idx lacks (was a bare KeyError)
    root = _rec(tmp_path / "b", [4, 5])
    with pytest.raises(
        RecordIOError, match=r"train\.rec: header record 0 at offset 0: .* record 3 is not in"
    ):
        RecordFaceDataset(root)
    # header with a single label (was an IndexError)
    root = _rec(tmp_path / "c", [3])
    with pytest.raises(RecordIOError, match=r"train\.rec: header record 0 at offset 0: expected \(first_id"):
        RecordFaceDataset(root)
    # an image record too short for its IRHeader (bad header): file, record and offset
    root = _rec(tmp_path / "d", [3, 4], broken={2: b"short"})
    ds = RecordFaceDataset(root)
    off = ds.rec.index[2]
    with pytest.raises(RecordIOError, match=rf"train\.rec: record 2 at offset {off}: record of 5 bytes"):
        ds[1]
