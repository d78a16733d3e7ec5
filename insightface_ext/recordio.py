"""MXNet RecordIO (``train.rec`` + ``train.idx``) in pure Python, as insightface's face datasets ship it.

Why: MS1MV2/MS1MV3/Glint360K/WebFace are distributed as MXNet RecordIO, and mxnet no longer installs on
current Pythons.  Format (dmlc-core ``recordio.h``): every part is ``uint32 magic 0xced7230a``,
``uint32 lrec = cflag << 29 | length``, the payload, zero padding to 4 bytes.  A record whose payload contains
the magic at a 4-byte-aligned position is split there into parts (cflag 1 = first, 2 = middle, 3 = last) and
the magic is re-inserted on reading.  A record's payload is an ``IRHeader`` (``struct 'IfQQ'``: flag, label,
id, id2; when flag > 0, ``flag`` float32 labels follow) and then the encoded image.

insightface layout: record 0 has flag 2 and label ``(first_identity_record, end)``; images are records
``1 .. first_identity_record-1``; identity records hold the ``[start, end)`` image range of each identity.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "IndexedRecordIO",
    "RecordIOWriter",
    "pack",
    "unpack",
    "pack_img",
    "unpack_img",
    "write_face_rec",
    "label_id",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A malformed .rec/.idx file; the message names the file and the byte offset."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def label_id(value, where: str, what: str = "label") -> int:
    """A stored float32 label as an integer id; ``int()`` would truncate 1.5 -> 1 and -0.5 -> 0, training
    on the wrong identity. A fractional, negative or non-finite value is a :class:`RecordIOError` naming
    ``where`` (file, record) and the value."""
    v = float(value)
    if not (math.isfinite(v) and v.is_integer() and v >= 0):
        raise RecordIOError(f"{where}: {what} {v!r} is not a non-negative integer identity id")
    return int(v)


def pack(header: IRHeader, payload: bytes) -> bytes:
    """IRHeader + payload; an array label is stored after the header with ``flag = len(label)``."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _HEADER.pack(0, float(label), header.id, header.id2) + payload
    arr = np.asarray(label, dtype="<f4").reshape(-1)
    return _HEADER.pack(arr.size, 0.0, header.id, header.id2) + arr.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    if len(record) < _HEADER.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_HEADER.size}-byte IRHeader")
    flag, label, id1, id2 = _HEADER.unpack_from(record)
    body = record[_HEADER.size :]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"IRHeader announces {flag} labels but only {len(body)} bytes follow")
        label = np.frombuffer(body, dtype="<f4", count=flag).copy()
        body = body[4 * flag :]
    return IRHeader(flag, label, id1, id2), body


def pack_img(header: IRHeader, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8 image with Pillow and pack it."""
    from PIL import Image

    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[img_fmt.lower()]
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format=fmt, quality=quality)
    return pack(header, buf.getvalue())


def unpack_img(record: bytes, mode: str = "RGB") -> tuple[IRHeader, np.ndarray]:
    """Header and the decoded image as uint8 (H, W, 3) RGB (``mode="L"``: (H, W))."""
    from PIL import Image

    header, body = unpack(record)
    with Image.open(io.BytesIO(body)) as im:
        return header, np.asarray(im.convert(mode))


class IndexedRecordIO:
    """Random access to a .rec through its .idx (``key<TAB>offset`` lines); without .idx, offsets are scanned."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.size = self.rec_path.stat().st_size
        if idx_path is None and self.rec_path.with_suffix(".idx").is_file():
            idx_path = self.rec_path.with_suffix(".idx")
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self.index: dict[int, int] = self._read_idx() if self.idx_path else self._scan()
        self.keys = sorted(self.index)
        self._fh = None

    def _read_idx(self) -> dict[int, int]:
        index = {}
        with open(self.idx_path, encoding="ascii", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    key, off = int(parts[0]), int(parts[1])
                except (IndexError, ValueError):
                    raise RecordIOError(
                        f"{self.idx_path}:{lineno}: expected 'key<TAB>offset', got {line.strip()!r}"
                    ) from None
                if not 0 <= off < self.size:
                    raise RecordIOError(
                        f"{self.idx_path}:{lineno}: offset {off} of key {key} is outside {self.rec_path} ({self.size} bytes)"
                    )
                index[key] = off
        return index

    def _scan(self) -> dict[int, int]:
        index, pos, key = {}, 0, 0
        with open(self.rec_path, "rb") as fh:
            while pos < self.size:
                index[key] = pos
                _, pos = self._read_parts(fh, pos)
                key += 1
        return index

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):  # DataLoader workers reopen the file
        state = self.__dict__.copy()
        state["_fh"] = None
        return state

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _read_parts(self, fh, offset: int) -> tuple[bytes, int]:
        """The record starting at ``offset`` and the offset just after it."""
        out, pos, first = bytearray(), offset, True
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise RecordIOError(
                    f"{self.rec_path}: truncated record header at offset {pos} (file has {self.size} bytes)"
                )
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x})"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise RecordIOError(f"{self.rec_path}: unexpected continuation flag {cflag} at offset {pos}")
            data = fh.read(length)
            if len(data) < length:
                raise RecordIOError(
                    f"{self.rec_path}: truncated record at offset {pos}: header says {length} bytes, only {len(data)} left"
                )
            out += data
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                return bytes(out), pos
            out += _MAGIC_BYTES
            first = False

    def read_at(self, offset: int) -> bytes:
        if self._fh is None:
            self._fh = open(self.rec_path, "rb")  # noqa: SIM115 - kept open for random access
        return self._read_parts(self._fh, offset)[0]

    def read_idx(self, key: int) -> bytes:
        if key not in self.index:
            raise KeyError(f"key {key} not in {self.idx_path or self.rec_path}")
        return self.read_at(self.index[key])

    def __iter__(self) -> Iterator[bytes]:
        for k in self.keys:
            yield self.read_idx(k)


class RecordIOWriter:
    """Sequential writer of a .rec and its .idx; written to temporary names and renamed on :meth:`close`."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_rec = self.rec_path.with_name(self.rec_path.name + ".part")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".part")
        self._rec = open(self._tmp_rec, "wb")  # noqa: SIM115
        self._idx = open(self._tmp_idx, "w", encoding="ascii")  # noqa: SIM115

    def _write_part(self, cflag: int, data: bytes) -> None:
        self._rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(data)))
        self._rec.write(data)
        self._rec.write(b"\0" * ((4 - len(data) % 4) % 4))

    def write_idx(self, key: int, record: bytes) -> int:
        """Append ``record`` under ``key``; returns its byte offset."""
        if len(record) > _LEN_MASK:
            raise ValueError(f"record of {len(record)} bytes exceeds the RecordIO limit of {_LEN_MASK}")
        offset = self._rec.tell()
        start = 0
        for i in range(0, len(record) - len(record) % 4, 4):
            if record[i : i + 4] == _MAGIC_BYTES:
                self._write_part(1 if start == 0 else 2, record[start:i])
                start = i + 4
        self._write_part(3 if start else 0, record[start:])
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        for fh in (self._rec, self._idx):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        os.replace(self._tmp_rec, self.rec_path)
        os.replace(self._tmp_idx, self.idx_path)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run leaves no half-written .rec behind
            self._rec.close()
            self._idx.close()
            for p in (self._tmp_rec, self._tmp_idx):
                p.unlink(missing_ok=True)


def write_face_rec(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[np.ndarray, int]],
    img_fmt: str = ".jpg",
    quality: int = 95,
) -> dict:
    """Write ``out_dir/train.rec`` + ``train.idx`` in insightface's layout from (image, identity) pairs.

    Images are regrouped by identity (ids must be 0..K-1); returns ``{"num_images", "num_classes"}``.
    """
    by_id: dict[int, list[np.ndarray]] = {}
    for i, (img, label) in enumerate(samples):
        by_id.setdefault(label_id(label, f"sample {i}", "identity label"), []).append(img)
    ids = sorted(by_id)
    if ids != list(range(len(ids))):
        raise ValueError(f"identity labels must be 0..K-1 without gaps, got {ids[:5]}...{ids[-5:]}")
    n = sum(len(v) for v in by_id.values())
    first_id_rec = n + 1
    out = Path(out_dir)
    with RecordIOWriter(out / "train.rec", out / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, np.array([first_id_rec, first_id_rec + len(ids)], "f4"), 0, 0), b""))
        key, ranges = 1, []
        for i in ids:
            start = key
            for img in by_id[i]:
                w.write_idx(
                    key, pack_img(IRHeader(0, float(i), key, 0), img, quality=quality, img_fmt=img_fmt)
                )
                key += 1
            ranges.append((start, key))
        for j, (a, b) in enumerate(ranges):
            w.write_idx(first_id_rec + j, pack(IRHeader(2, np.array([a, b], "f4"), first_id_rec + j, 0), b""))
    return {"num_images": n, "num_classes": len(ids)}
