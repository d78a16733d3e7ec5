"""Face verification evaluation: insightface ``.bin`` pair sets (LFW / CFP-FP / AgeDB-30) and user pair lists.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2 * n`` encoded images (pairs are consecutive) and ``n``
booleans.  Embeddings are the sum of the image's and its mirror's embedding (insightface's protocol), then
L2-normalised; accuracy is the 10-fold LFW protocol and TAR@FAR is reported beside it.  The threshold
search and the metrics are the core's (:mod:`mhe_plugins.metrics`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mhe_plugins.metrics import pair_scores, tar_at_far, verification_accuracy_10fold

from .data import to_tensor

__all__ = [
    "load_bin",
    "write_bin",
    "embed_images",
    "evaluate_bin",
    "read_pairs",
    "evaluate_pairs",
    "verification_metrics",
]

FARS = (1e-4, 1e-3, 1e-2)

# What an insightface .bin may reference: bytes/bytearray (py2 strings come as _codecs.encode) and numpy
# arrays/scalars of bools or bytes. Anything else (os.system, subprocess, eval, ...) is refused, so a crafted
# file cannot run code while it is read.
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("__builtin__", "bytearray"),
    ("__builtin__", "bytes"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_SAFE_GLOBALS` (the types a verification .bin holds)."""

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"{self.path}: refuses to load {module}.{name}: a verification .bin holds only image bytes "
                "and booleans (this file would run code when unpickled)"
            )
        return super().find_class(module, name)


def _read_bin_pickle(path: Path):
    with open(path, "rb") as fh:
        return _BinUnpickler(fh, path).load()


def _decode(buf: bytes, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def load_bin(
    path: str | os.PathLike, image_size: int | None = None, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images uint8 (2n, H, W[, 3]) and issame bool (n,) from an insightface verification ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path}")
    try:
        bins, issame = _read_bin_pickle(path)
    except pickle.UnpicklingError as exc:
        if str(path) in str(exc):
            raise ValueError(str(exc)) from None
        raise ValueError(f"{path}: not an insightface verification .bin: {exc}") from exc
    except Exception as exc:
        raise ValueError(
            f"{path}: not an insightface verification .bin (pickled (bins, issame_list)): {exc}"
        ) from exc
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected 2 images per pair)")
    images = []
    for i, b in enumerate(bins):
        try:
            images.append(_decode(bytes(b), image_size, channels))
        except OSError as exc:
            raise ValueError(f"{path}: image {i} cannot be decoded: {exc}") from exc
    return np.stack(images), np.asarray(issame, dtype=bool)


def write_bin(
    path: str | os.PathLike, images: Sequence[np.ndarray], issame: Sequence[bool], fmt: str = "PNG"
) -> None:
    """Write a ``.bin`` in insightface's format (used by tests and to export the glyph pairs)."""
    from PIL import Image

    bins = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format=fmt)
        bins.append(buf.getvalue())
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        pickle.dump((bins, list(map(bool, issame))), fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


@torch.no_grad()
def embed_images(
    model: nn.Module, images: np.ndarray, batch_size: int = 256, flip: bool = True, channels: int = 3
) -> np.ndarray:
    """L2-normalised embeddings (n, d) of uint8 images; ``flip`` adds the mirrored image's embedding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im, channels) for im in images[i : i + batch_size]]).to(device)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(F.normalize(e).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def verification_metrics(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = FARS) -> dict:
    """10-fold accuracy (percent, mean +- std) and TAR@FAR (percent) of pair scores."""
    res = verification_accuracy_10fold(scores, issame=issame)
    out = {"acc10fold": 100.0 * float(res.accuracy_mean), "acc10fold_std": 100.0 * float(res.accuracy_std)}
    for far, tar in tar_at_far(scores, issame, fars).items():
        out[f"tar_at_far_{far:.0e}".replace("e-0", "e-")] = 100.0 * tar
    out["num_pairs"] = int(len(issame))
    return out


def evaluate_bin(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int | None = None,
    channels: int = 3,
    batch_size: int = 256,
) -> dict:
    images, issame = load_bin(path, image_size, channels)
    emb = embed_images(model, images, batch_size, channels=channels)
    return verification_metrics(pair_scores(emb[0::2], emb[1::2]), issame)


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """``image1 image2 label`` per line (label 1 = same identity, 0 = different); ``#`` comments allowed."""
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'image1 image2 0|1', got {line!r}")
            pairs.append((parts[0], parts[1], parts[2] == "1"))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def evaluate_pairs(
    model: nn.Module,
    pairs_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int = 3,
    batch_size: int = 256,
) -> dict:
    """Template-free TAR@FAR (IJB-style metric) and 10-fold accuracy on a user pair list; each image embedded once."""
    from PIL import Image

    pairs = read_pairs(pairs_file)
    root = Path(root) if root is not None else Path(pairs_file).parent
    names = sorted({p for a, b, _ in pairs for p in (a, b)})
    images = []
    for n in names:
        f = root / n
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                images.append(np.asarray(im))
        except OSError as exc:
            raise ValueError(f"{pairs_file}: image {f} cannot be read: {exc}") from exc
    emb = embed_images(model, np.stack(images), batch_size, channels=channels)
    pos = {n: i for i, n in enumerate(names)}
    a = np.array([pos[p[0]] for p in pairs])
    b = np.array([pos[p[1]] for p in pairs])
    same = np.array([p[2] for p in pairs])
    return verification_metrics(pair_scores(emb[a], emb[b]), same)
