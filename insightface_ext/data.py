"""Training data for face recognition: insightface RecordIO, an ImageFolder of identities, or the glyph stand-in.

``open_train_dataset(rec)`` picks the reader from what ``rec`` points to:

* a directory with ``train.rec`` (+ ``train.idx``)  -> :class:`RecordFaceDataset` (insightface layout);
* ``glyphs:DIR`` (optionally ``glyphs:DIR:split``)   -> :class:`GlyphFaceDataset` (CJK glyphs; not faces);
* any other directory                               -> :class:`ImageFolderFaceDataset` (one sub-dir per id).

Every dataset returns ``(float tensor (C, H, W) in [-1, 1], int label)``: arcface_torch's normalisation.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .recordio import IndexedRecordIO, RecordIOError, label_id, unpack

__all__ = [
    "RecordFaceDataset",
    "ImageFolderFaceDataset",
    "GlyphFaceDataset",
    "open_train_dataset",
    "to_tensor",
]

_IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def to_tensor(img: np.ndarray, channels: int = 3, flip: bool = False) -> torch.Tensor:
    """uint8 (H, W[, C]) -> float (channels, H, W) with (x / 255 - 0.5) / 0.5, optional horizontal flip."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] != channels:
        a = (
            a.mean(axis=2, keepdims=True).astype(np.uint8)
            if channels == 1
            else np.repeat(a[:, :, :1], channels, 2)
        )
    if flip:
        a = a[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()
    return t.div_(127.5).sub_(1.0)


class _FaceDataset(Dataset):
    num_classes: int

    def __init__(self, train: bool, channels: int):
        self.train, self.channels = train, channels

    def _flip(self) -> bool:
        return self.train and bool(torch.rand(()) < 0.5)


def _decode_rgb(body: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(body)) as im:
        return np.asarray(im.convert("RGB"))


class RecordFaceDataset(_FaceDataset):
    """insightface ``train.rec``/``train.idx``: header record 0 lists the image and identity record ranges."""

    def __init__(self, root: str | os.PathLike, train: bool = True, channels: int = 3):
        super().__init__(train, channels)
        root = Path(root)
        self.rec = IndexedRecordIO(
            root / "train.rec", root / "train.idx" if (root / "train.idx").is_file() else None
        )
        if not self.rec.keys:
            raise RecordIOError(f"{self.rec.rec_path}: no records")
        header, _ = self._unpack(self.rec.keys[0])
        if header.flag > 0:  # insightface header: image records 1..first_id-1, then one record per identity
            where = f"{self.rec.rec_path}: header record {self.rec.keys[0]} at offset {self.rec.index[self.rec.keys[0]]}"
            if header.flag < 2:
                raise RecordIOError(
                    f"{where}: expected (first_id, end_id) labels, got {header.label.tolist()}"
                )
            first_id, end_id = (label_id(v, where, "identity range bound") for v in header.label[:2])
            if not 1 <= first_id <= end_id:
                raise RecordIOError(f"{where}: bad identity range first_id={first_id}, end_id={end_id}")
            missing = [k for k in (1, first_id - 1) if first_id > 1 and k not in self.rec.index]
            if missing:
                raise RecordIOError(
                    f"{where}: header says images are records 1..{first_id - 1} but record {missing[0]} is not "
                    f"in {self.rec.idx_path or self.rec.rec_path}"
                )
            self.imgidx = np.arange(1, first_id)
            self.num_classes = end_id - first_id
        else:  # plain im2rec file: every record is an image; labels are read once to count identities
            self.imgidx = np.asarray(self.rec.keys)
            self.num_classes = 1 + max((self._label(k) for k in self.imgidx), default=-1)

    def _where(self, key: int) -> str:
        return f"{self.rec.rec_path}: record {key} at offset {self.rec.index[key]}"

    def _unpack(self, key: int):
        """``unpack`` of record ``key``; errors name the file, the record and its offset."""
        if key not in self.rec.index:
            raise RecordIOError(
                f"{self.rec.rec_path}: record {key} is not in {self.rec.idx_path or 'the file'}"
            )
        try:
            return unpack(self.rec.read_idx(key))
        except RecordIOError as exc:
            if str(self.rec.rec_path) in str(exc):
                raise
            raise RecordIOError(f"{self._where(key)}: {exc}") from None

    def _label(self, key: int) -> int:
        header, _ = self._unpack(int(key))
        lab = header.label
        return label_id(lab if np.isscalar(lab) else lab[0], self._where(int(key)))

    def __len__(self) -> int:
        return len(self.imgidx)

    def __getitem__(self, i: int):
        key = int(self.imgidx[i])
        header, body = self._unpack(key)  # names file and offset on a bad header
        where = self._where(key)
        try:
            img = _decode_rgb(body)
        except OSError as exc:  # Pillow cannot decode the payload
            raise RecordIOError(f"{where}: cannot decode image: {exc}") from exc
        label = label_id(header.label if np.isscalar(header.label) else header.label[0], where)
        if not 0 <= label < self.num_classes:
            raise RecordIOError(f"{where}: label {label} outside [0, {self.num_classes})")
        return to_tensor(img, self.channels, self._flip()), label


class ImageFolderFaceDataset(_FaceDataset):
    """``root/<identity>/<image>``; identities are the sorted sub-directory names."""

    def __init__(self, root: str | os.PathLike, train: bool = True, channels: int = 3):
        super().__init__(train, channels)
        root = Path(root)
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{root}: no identity sub-directories (expected root/<identity>/<image>)")
        self.files: list[Path] = []
        labels = []
        for i, c in enumerate(self.classes):
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() in _IMG_EXT:
                    self.files.append(f)
                    labels.append(i)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                img = np.asarray(im.convert("RGB" if self.channels == 3 else "L"))
        except OSError as exc:
            raise OSError(f"cannot decode image {self.files[i]}: {exc}") from exc
        return to_tensor(img, self.channels, self._flip()), int(self.labels[i])


class GlyphFaceDataset(_FaceDataset):
    """CJK glyph renders as an open-set stand-in for faces (class = character, sample = font). Not faces."""

    def __init__(self, root: str | os.PathLike, split: str = "train", train: bool = True, channels: int = 1):
        super().__init__(train, channels)
        from mhe_plugins.datasets.glyphs import load_glyph_split, read_classes

        self.images, self.labels, self.fonts = load_glyph_split(root, split)
        self.num_classes = len(read_classes(root))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        # no flip: a mirrored glyph is another shape
        return to_tensor(self.images[i], self.channels, False), int(self.labels[i])


def open_train_dataset(rec: str, channels: int = 3, train: bool = True) -> _FaceDataset:
    """The dataset behind a config's ``rec`` (see module docstring)."""
    if rec.startswith("glyphs:"):
        parts = rec.split(":")
        return GlyphFaceDataset(parts[1], parts[2] if len(parts) > 2 else "train", train, channels)
    root = Path(rec)
    if (root / "train.rec").is_file():
        return RecordFaceDataset(root, train, channels)
    if root.is_dir():
        return ImageFolderFaceDataset(root, train, channels)
    raise FileNotFoundError(f"rec={rec!r}: neither a dir with train.rec, an ImageFolder dir, nor glyphs:DIR")
