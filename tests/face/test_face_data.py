"""RecordIO reader/writer (pure Python), insightface .rec layout, ImageFolder reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from insightface_ext.data import ImageFolderFaceDataset, RecordFaceDataset, open_train_dataset
from insightface_ext.recordio import (
    MAGIC,
    IndexedRecordIO,
    IRHeader,
    RecordIOError,
    RecordIOWriter,
    pack,
    unpack,
    write_face_rec,
)


def _images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_roundtrip_including_payloads_that_contain_the_magic(tmp_path):
    magic = struct.pack("<I", MAGIC)
    payloads = [b"abc", magic + b"12345678", b"xy" * 3 + magic * 3 + b"z", b"", b"a" * 4 + magic]
    with RecordIOWriter(tmp_path / "t.rec") as w:
        offsets = [w.write_idx(i * 10, pack(IRHeader(0, float(i), i, 0), p)) for i, p in enumerate(payloads)]
    raw = (tmp_path / "t.rec").read_bytes()
    assert struct.unpack_from("<I", raw, 4)[0] >> 29 == 0  # a plain record
    assert struct.unpack_from("<I", raw, offsets[1] + 4)[0] >> 29 == 1  # split at the embedded magic
    for reader in (IndexedRecordIO(tmp_path / "t.rec"), IndexedRecordIO(tmp_path / "t.rec", idx_path=None)):
        assert reader.keys == [0, 10, 20, 30, 40]
        for i, p in enumerate(payloads):
            h, body = unpack(reader.read_idx(i * 10))
            assert body == p and h.label == i and h.id == i
    # without the .idx the offsets are found by scanning
    (tmp_path / "t.idx").unlink()
    assert IndexedRecordIO(tmp_path / "t.rec").index == {i: o for i, o in enumerate(offsets)}


def test_array_label_header():
    h, body = unpack(pack(IRHeader(0, np.array([3.0, 7.0]), 5, 0), b"img"))
    assert h.flag == 2 and list(h.label) == [3.0, 7.0] and body == b"img"


def test_corrupt_and_truncated_records_name_the_offset(tmp_path):
    with RecordIOWriter(tmp_path / "c.rec") as w:
        w.write_idx(0, b"a" * 40)
        off = w.write_idx(1, b"b" * 40)
    data = bytearray((tmp_path / "c.rec").read_bytes())
    data[off] ^= 0xFF
    (tmp_path / "c.rec").write_bytes(bytes(data))
    r = IndexedRecordIO(tmp_path / "c.rec")
    assert r.read_idx(0) == b"a" * 40
    with pytest.raises(RecordIOError, match=rf"bad magic .* at offset {off}"):
        r.read_idx(1)
    data[off] ^= 0xFF  # repair the magic, then cut the file inside record 1
    (tmp_path / "c.rec").write_bytes(bytes(data[: off + 20]))
    with pytest.raises(
        RecordIOError, match=rf"truncated record at offset {off}: header says 40 bytes, only 12 left"
    ):
        IndexedRecordIO(tmp_path / "c.rec").read_idx(1)
    (tmp_path / "c.idx").write_text("0\t0\n1\t999999\n")
    with pytest.raises(RecordIOError, match=r"c.idx:2: offset 999999"):
        IndexedRecordIO(tmp_path / "c.rec")


def test_failed_writer_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordIOWriter(tmp_path / "f.rec") as w:
            w.write_idx(0, b"abcd")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_insightface_layout_dataset(tmp_path):
    imgs = _images(7)
    labels = [2, 0, 1, 0, 2, 2, 1]
    stats = write_face_rec(tmp_path, zip(imgs, labels), img_fmt=".png")
    assert stats == {"num_images": 7, "num_classes": 3}
    ds = open_train_dataset(str(tmp_path), channels=3, train=False)
    assert isinstance(ds, RecordFaceDataset) and len(ds) == 7 and ds.num_classes == 3
    # images are regrouped by identity: 0, 0, 1, 1, 2, 2, 2 in input order within each identity
    order = [1, 3, 2, 6, 0, 4, 5]
    for i, j in enumerate(order):
        x, y = ds[i]
        assert y == labels[j]
        expect = torch.from_numpy(imgs[j].transpose(2, 0, 1)).float() / 127.5 - 1
        torch.testing.assert_close(x, expect)
    # identity records hold the image ranges
    h, _ = unpack(ds.rec.read_idx(8))
    assert list(h.label) == [1, 3]


def test_dataset_reports_bad_label_with_offset(tmp_path):
    write_face_rec(tmp_path, zip(_images(2), [0, 1]), img_fmt=".png")
    ds = RecordFaceDataset(tmp_path)
    ds.num_classes = 1  # as if the header listed fewer identities
    with pytest.raises(RecordIOError, match=r"record 2 at offset \d+: label 1 outside \[0, 1\)"):
        ds[1]


def test_image_folder(tmp_path):
    from PIL import Image

    for ident, n in (("bob", 2), ("alice", 3)):
        (tmp_path / ident).mkdir()
        for k, img in enumerate(_images(n, seed=n)):
            Image.fromarray(img).save(tmp_path / ident / f"{k}.png")
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    ds = open_train_dataset(str(tmp_path))
    assert isinstance(ds, ImageFolderFaceDataset)
    assert ds.classes == ["alice", "bob"] and len(ds) == 5 and list(ds.labels) == [0, 0, 0, 1, 1]
    assert ds[4][0].shape == (3, 16, 16)
