"""CJK glyph classification data: one class per GB2312 hanzi, rendered from CJK fonts (Debian font packages).

Why: no image set with thousands of classes is reachable offline, but every CJK font is a "writer"
of the same few thousand characters.  Splitting by font gives a real generalisation test (unseen
writers).  Renders that are blank (fonts mapping code points to empty glyphs) or exact duplicates
are dropped; any train/valid image that is byte-identical to a test image is removed from train
(e.g. WenQuanYi Micro Hei is derived from Droid Sans Fallback), so the test set stays unseen.

Layout written by :func:`build_glyph_dataset` (``out_dir``)::

    train.npz valid.npz test.npz   # images uint8 (n, S, S), labels int64 (n,), fonts str (n,)
    classes.txt                    # one character per line, line i = class i
    meta.json                      # charset, size, font packages, faces per split, counts

The fonts come from a directory the caller names (``<package>/.../*.ttf``); this module never fetches
anything. ``python -m timm_ext.glyph_builder`` fetches the Debian packages into a per-user font cache.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lines import read_name_list

#: Packages whose faces form the test split (unseen writers).
TEST_PACKAGES: tuple[str, ...] = ("fonts-cwtex-kai", "fonts-wqy-microhei", "fonts-ipaexfont-mincho")
SPLITS = ("train", "valid", "test")
_FONT_EXT = (".ttf", ".ttc", ".otf", ".otc")


def charset_codepoints(charset: str) -> list[int]:
    """Code points of a GB2312 level in GB2312 order (level 1: 3,755 hanzi, level 2: 3,008)."""
    rows = {"gb2312-1": range(0xB0, 0xD8), "gb2312-2": range(0xD8, 0xF8)}
    if charset not in rows:
        raise ValueError(f"unknown charset {charset!r}; expected one of {sorted(rows)}")
    out = []
    for hi in rows[charset]:
        for lo in range(0xA1, 0xFF):
            try:
                out.append(ord(bytes([hi, lo]).decode("gb2312")))
            except UnicodeDecodeError:  # the 5 unassigned cells at the end of row 55
                continue
    return out


@dataclass(frozen=True)
class FontFace:
    """One face of a font file (a .ttc holds several)."""

    path: str
    index: int
    package: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.package}:{Path(self.path).name}#{self.index}"


def discover_faces(fonts_dir: str | Path, packages: Sequence[str] | None = None) -> list[FontFace]:
    """All faces below ``fonts_dir``; the package is the first path component (``<pkg>/usr/...``)."""
    from fontTools.ttLib import TTCollection, TTFont

    fonts_dir = Path(fonts_dir)
    faces = []
    for path in sorted(glob.glob(str(fonts_dir / "**" / "*"), recursive=True)):
        if not path.lower().endswith(_FONT_EXT) or not os.path.isfile(path):
            continue
        rel = Path(path).relative_to(fonts_dir).parts
        package = rel[0] if len(rel) > 1 else Path(path).stem
        if package == "debs" or (packages is not None and package not in packages):
            continue
        try:
            n = len(TTCollection(path).fonts) if path.lower().endswith(("c",)) else 1
            for i in range(n):
                name = TTFont(path, fontNumber=i, lazy=True)["name"].getDebugName(4) or Path(path).stem
                faces.append(FontFace(path, i, package, name))
        except Exception as exc:  # fontTools raises many types on broken files
            raise ValueError(f"cannot read font file {path}: {exc}") from exc
    return faces


def render_face(face: FontFace, codepoints: Sequence[int], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Render every code point the face maps; returns (images (n,S,S) uint8, class indices (n,)).

    The glyph's ink box is centred on the canvas (position carries no class information); glyphs
    that are unmapped, blank or fail to render are skipped.
    """
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageDraw, ImageFont

    cmap = TTFont(face.path, fontNumber=face.index, lazy=True).getBestCmap() or {}
    font = ImageFont.truetype(face.path, int(round(size * 0.85)), index=face.index)
    imgs, labels = [], []
    for cls, cp in enumerate(codepoints):
        if cp not in cmap:
            continue
        ch = chr(cp)
        try:
            left, top, right, bottom = font.getbbox(ch)
        except OSError:
            continue
        im = Image.new("L", (size, size))
        x = (size - (right - left)) // 2 - left
        y = (size - (bottom - top)) // 2 - top
        ImageDraw.Draw(im).text((x, y), ch, font=font, fill=255)
        arr = np.asarray(im)
        if arr.max() <= 127:  # empty glyph (e.g. SetoFont-ex) or a hairline
            continue
        imgs.append(arr)
        labels.append(cls)
    if not imgs:
        return np.zeros((0, size, size), np.uint8), np.zeros((0,), np.int64)
    return np.stack(imgs), np.asarray(labels, np.int64)


def _render_job(args: tuple[FontFace, Sequence[int], int]) -> tuple[np.ndarray, np.ndarray]:
    return render_face(*args)


def _dedup(images: np.ndarray, labels: np.ndarray, banned: set[bytes] | None = None) -> np.ndarray:
    """Indices of the first occurrence of each (label, bitmap), skipping keys in ``banned``."""
    seen: set[bytes] = set()
    keep = []
    for i in range(len(labels)):
        key = labels[i].tobytes() + images[i].tobytes()
        if key in seen or (banned is not None and key in banned):
            continue
        seen.add(key)
        keep.append(i)
    return np.asarray(keep, np.int64)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically: a crash never leaves a half-written split behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_glyph_dataset(
    out_dir: str | Path,
    fonts_dir: str | Path,
    charset: str = "gb2312-1",
    size: int = 32,
    test_packages: Sequence[str] = TEST_PACKAGES,
    packages: Sequence[str] | None = None,
    valid_fraction: float = 0.05,
    num_classes: int | None = None,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    codepoints: Sequence[int] | None = None,
) -> dict:
    """Render, deduplicate and split the glyph set; returns the statistics also written to meta.json.

    ``packages`` restricts which package dirs below ``fonts_dir`` are used (default: all of them).
    ``num_classes`` keeps only the first K characters of the charset (the committed test subset).
    ``valid`` is a random ``valid_fraction`` of the train-font renderings (seeded). ``codepoints``
    replaces the charset by an explicit class list (tests, other scripts).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    custom = codepoints is not None
    codepoints = list(codepoints) if custom else charset_codepoints(charset)
    if num_classes is not None:
        if not 0 < num_classes <= len(codepoints):
            raise ValueError(f"num_classes must be in 1..{len(codepoints)} for {charset}, got {num_classes}")
        codepoints = codepoints[:num_classes]
    fonts_dir = Path(fonts_dir)
    if not fonts_dir.is_dir():
        raise FileNotFoundError(f"fonts dir {fonts_dir} does not exist")
    faces = discover_faces(fonts_dir, packages)
    if not faces:
        raise FileNotFoundError(f"no .ttf/.ttc/.otf/.otc font faces found under {fonts_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    jobs = [(f, codepoints, size) for f in faces]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(
                tqdm(ex.map(_render_job, jobs), total=len(jobs), desc="render faces", disable=not progress)
            )
    else:
        results = [_render_job(j) for j in tqdm(jobs, desc="render faces", disable=not progress)]

    def gather(select: Callable[[FontFace], bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ims, labs, names = [], [], []
        for face, (im, lab) in zip(faces, results):
            if select(face) and len(lab):
                ims.append(im)
                labs.append(lab)
                names.append(np.full(len(lab), face.id, dtype=object))
        if not ims:
            return np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64), np.zeros(0, dtype=str)
        return np.concatenate(ims), np.concatenate(labs), np.concatenate(names).astype(str)

    test_set = set(test_packages)
    te_im, te_lab, te_font = gather(lambda f: f.package in test_set)
    tr_im, tr_lab, tr_font = gather(lambda f: f.package not in test_set)
    for name, lab, which in (("test", te_lab, sorted(test_set)), ("train", tr_lab, "all other packages")):
        if len(lab) == 0:
            raise ValueError(
                f"no glyph of {'the given code points' if custom else charset} rendered for the {name} split "
                f"(font packages: {which}) under {fonts_dir}; do these fonts cover the characters?"
            )
    keep = _dedup(te_im, te_lab)
    te_im, te_lab, te_font = te_im[keep], te_lab[keep], te_font[keep]
    banned = {te_lab[i].tobytes() + te_im[i].tobytes() for i in range(len(te_lab))}
    n_dup = len(tr_lab) - len(_dedup(tr_im, tr_lab))
    keep = _dedup(tr_im, tr_lab, banned)
    n_leak = len(tr_lab) - len(keep) - n_dup
    tr_im, tr_lab, tr_font = tr_im[keep], tr_lab[keep], tr_font[keep]

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(tr_lab))
    n_valid = int(round(valid_fraction * len(tr_lab)))
    va_idx, tr_idx = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    splits = {
        "train": (tr_im[tr_idx], tr_lab[tr_idx], tr_font[tr_idx]),
        "valid": (tr_im[va_idx], tr_lab[va_idx], tr_font[va_idx]),
        "test": (te_im, te_lab, te_font),
    }
    for name, (im, lab, fnt) in splits.items():
        _save_npz(out_dir / f"{name}.npz", images=im, labels=lab, fonts=fnt)
    (out_dir / "classes.txt").write_text("".join(chr(c) + "\n" for c in codepoints), encoding="utf-8")
    meta = {
        "charset": "custom" if custom else charset,
        "size": size,
        "num_classes": len(codepoints),
        "font_packages": sorted({f.package for f in faces}),  # not the fonts dir: a path of one machine
        "test_packages": sorted(test_set),
        "valid_fraction": valid_fraction,
        "seed": seed,
        "removed_train_duplicates": int(n_dup),
        "removed_train_copies_of_test": int(n_leak),
        "splits": {
            name: {
                "images": int(len(lab)),
                "classes_present": int(len(np.unique(lab))),
                "faces": sorted(set(fnt.tolist())),
            }
            for name, (_, lab, fnt) in splits.items()
        },
    }
    tmp = out_dir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out_dir / "meta.json")
    return meta


def subset_glyph_dataset(src_dir: str | Path, out_dir: str | Path, num_classes: int) -> dict:
    """Copy the first ``num_classes`` classes of a built dataset (the committed test subset)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    classes = read_classes(src_dir)
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"num_classes must be in 1..{len(classes)}, got {num_classes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        im, lab, fnt = load_glyph_split(src_dir, split)
        m = lab < num_classes
        _save_npz(out_dir / f"{split}.npz", images=im[m], labels=lab[m], fonts=fnt[m])
        counts[split] = int(m.sum())
    (out_dir / "classes.txt").write_text("".join(c + "\n" for c in classes[:num_classes]), encoding="utf-8")
    meta = (
        json.loads((src_dir / "meta.json").read_text(encoding="utf-8"))
        if (src_dir / "meta.json").exists()
        else {}
    )
    # the source set by name only: meta.json ships with the data, a path would name one machine's folders
    meta.update({"num_classes": num_classes, "subset_of": src_dir.resolve().name, "split_images": counts})
    meta.pop("splits", None)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    return meta


def read_classes(data_dir: str | Path) -> list[str]:
    """Class names (characters) of a built dataset, in label order."""
    path = Path(data_dir) / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the set with `python -m timm_ext.datasets glyphs --out DIR`"
        )
    return read_name_list(path)  # blank / repeated lines are errors, not extra classes


def load_glyph_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (n,S,S), labels int64 (n,), font ids str (n,)) of one split, validated."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the set with `python -m timm_ext.datasets glyphs --out DIR`"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, fonts = z["images"], z["labels"], z["fonts"]
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ValueError(f"{path}: corrupt or truncated npz file ({type(exc).__name__}: {exc})") from exc
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a glyph split (needs arrays images, labels, fonts): {exc}") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: labels must be a 1-d integer array, got {labels.dtype} {labels.shape}"
            f"{_first_non_integer(labels)}; casting would truncate them"
        )
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 (n, S, S), got {images.dtype} {images.shape}")
    if not (len(images) == len(labels) == len(fonts)):
        raise ValueError(
            f"{path}: images/labels/fonts lengths differ: {len(images)}/{len(labels)}/{len(fonts)}"
        )
    if len(labels) and labels.min() < 0:
        i = int(np.argmin(labels))
        raise ValueError(f"{path}: item {i} has negative label {int(labels[i])}")
    return images, labels.astype(np.int64), fonts


def _first_non_integer(labels: np.ndarray) -> str:
    """``": item i is v"`` for the first label that is not a whole number (else the first label)."""
    flat = labels.reshape(-1)
    if not len(flat):
        return ""
    i = 0
    if flat.dtype.kind == "f":
        frac = np.flatnonzero(~np.isfinite(flat) | (flat != np.floor(flat)))
        i = int(frac[0]) if len(frac) else 0
    return f": item {i} is {flat[i].item()!r}"


class GlyphDataset:
    """torch/timm-compatible dataset over one split: ``ds[i] -> (PIL image, label)``.

    Like timm's ``ImageDataset`` it exposes a settable ``transform`` (``create_loader`` assigns it)
    and ``target_transform``; images are returned as RGB by default so stock timm transforms and
    3-channel backbones work unchanged (``mode="L"`` keeps one channel).
    """

    def __init__(
        self, root: str | Path, split: str = "train", transform=None, target_transform=None, mode: str = "RGB"
    ):
        self.root = Path(root)
        self.split = split
        self.images, self.targets, self.fonts = load_glyph_split(self.root, split)
        self.classes = read_classes(self.root)
        if len(self.targets) and int(self.targets.max()) >= len(self.classes):
            i = int(np.argmax(self.targets))
            raise ValueError(
                f"{self.root / (split + '.npz')}: item {i} has label {int(self.targets[i])} "
                f">= {len(self.classes)} classes in classes.txt"
            )
        self.transform = transform
        self.target_transform = target_transform
        self.mode = mode

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.images[index])  # uint8 (S, S) -> mode "L"
        if self.mode != "L":
            img = img.convert(self.mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """timm's dataset API: a printable name for item ``index`` (font id + class)."""
        return f"{self.fonts[index]}/{self.classes[self.targets[index]]}"

    def filenames(self, basename: bool = False, absolute: bool = False) -> list[str]:
        return [self.filename(i) for i in range(len(self))]
