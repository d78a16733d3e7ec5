"""Datasets and loaders through timm's own pipeline (``create_dataset``/``create_loader``), plus the checks
that turn bad data into errors naming the item instead of silently skipped samples."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_loader

from mhe_plugins.datasets.glyphs import SPLITS as GLYPH_SPLITS
from mhe_plugins.datasets.glyphs import GlyphDataset

#: timm's split synonyms (``timm.data.dataset_factory``), searched in the same order as timm
TRAIN_SYNONYMS = ("train", "training")
EVAL_SYNONYMS = ("val", "valid", "validation", "eval", "evaluation")
#: timm dataset names that read a folder (timm falls back to the root folder when the split is missing)
FOLDER_DATASETS = ("", "folder", "imagefolder", "torch/folder", "torch/image_folder")


def split_candidates(split: str) -> list[str]:
    """``split`` first, then timm's synonyms of it (``valid`` -> val, validation, eval, evaluation)."""
    name = split.split("[")[0]
    for syn in (TRAIN_SYNONYMS, EVAL_SYNONYMS):
        if name in syn:
            return [name, *[s for s in syn if s != name]]
    return [name]


def resolve_split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    """The folder of ``split`` under ``data_dir``, searched like timm's ``_search_split``.

    Unlike timm, a missing split is an error instead of the whole ``data_dir``: falling back silently pooled
    train, validation and test into one "validation" set. ``split='.'`` means ``data_dir`` itself.
    """
    root = Path(data_dir)
    tried = [root / c for c in split_candidates(split)]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"split {split!r} not found in {root}: tried {', '.join(str(p) for p in tried)}; "
        f"name the folder with --val-split/--train-split/--split (use '.' for {root} itself)"
    )


def glyph_split(split: str) -> str:
    """Map timm's split names onto the glyph set's train/valid/test files."""
    if split in GLYPH_SPLITS:
        return split
    name = split.split("[")[0]
    if name in TRAIN_SYNONYMS:
        return "train"
    if name in EVAL_SYNONYMS:
        return "valid"
    raise ValueError(f"unknown glyph split {split!r}; expected one of {GLYPH_SPLITS} or a timm synonym")


class StrictImageDataset(ImageDataset):
    """timm's ``ImageDataset`` that raises on an unreadable image (timm skips it with a warning)."""

    def __getitem__(self, index: int):
        img, target, *_ = self.reader[index]
        name = self.reader.filename(index, absolute=True)
        try:
            img = Image.open(img)
            img = img.convert(self.input_img_mode) if self.input_img_mode else img
        except Image.DecompressionBombError as exc:
            raise ValueError(
                f"image {name} (item {index}) is too large to decode safely (PIL decompression-bomb "
                f"limit {Image.MAX_IMAGE_PIXELS} pixels): {exc}"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ValueError(f"corrupt or unreadable image {name} (item {index}): {exc}") from exc
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def as_class_map(classes: Mapping[str, int] | Sequence[str] | None) -> dict[str, int] | None:
    """``{name: id}`` from a map or from names in id order (a checkpoint's ``class_names``)."""
    if classes is None:
        return None
    if isinstance(classes, Mapping):
        return {str(n): int(i) for n, i in classes.items()}
    names = [str(n) for n in classes]
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise ValueError(f"class names repeat {dup!r}: a name must map to one id")
    return {n: i for i, n in enumerate(names)}


def class_map_of(ds) -> dict[str, int] | None:
    """The dataset's own ``{class name: id}`` (ImageFolder readers, torchvision sets, glyph sets), or None."""
    mapping = getattr(getattr(ds, "reader", None), "class_to_idx", None) or getattr(ds, "class_to_idx", None)
    if mapping:
        return {str(n): int(i) for n, i in mapping.items()}
    names = getattr(ds, "classes", None)
    return {str(n): i for i, n in enumerate(names)} if names else None


def _unknown_classes(found: Mapping[str, int], class_map: Mapping[str, int], where: str) -> None:
    extra = sorted(set(found) - set(class_map))
    if extra:
        shown = ", ".join(repr(n) for n in extra[:10]) + (", ..." if len(extra) > 10 else "")
        raise ValueError(
            f"{where}: {len(extra)} class(es) {shown} are not classes of the training split / checkpoint "
            f"({len(class_map)} classes); their ids would be meaningless to the model"
        )


def apply_class_map(ds, class_map: Mapping[str, int], where: str):
    """Re-label a folder dataset with ``class_map`` (the training split's ids) instead of the ids its own
    folders got: timm numbers the folders it finds, so a split lacking one class shifted every later class.
    Missing classes are fine; folders not in ``class_map`` are an error naming them."""
    found = class_map_of(ds)
    if found is None:
        raise TypeError(f"{where}: {type(ds).__name__} has no class_to_idx to re-map")
    _unknown_classes(found, class_map, where)
    new = {i: class_map[n] for n, i in found.items()}
    holder = ds.reader if hasattr(getattr(ds, "reader", None), "samples") else ds
    holder.samples = [(f, new[int(t)]) for f, t in holder.samples]
    holder.class_to_idx = dict(class_map)
    if hasattr(holder, "targets"):  # torchvision ImageFolder keeps targets/imgs/classes beside samples
        holder.targets = [t for _, t in holder.samples]
    if hasattr(holder, "imgs"):
        holder.imgs = holder.samples
    if hasattr(holder, "classes"):
        holder.classes = sorted(class_map, key=class_map.__getitem__)
    return ds


def check_class_map(ds, class_map: Mapping[str, int], where: str) -> None:
    """A dataset with fixed ids (glyphs, torchvision sets) must agree with ``class_map`` on every class."""
    found = class_map_of(ds)
    if found is None:
        return
    _unknown_classes(found, class_map, where)
    for name, i in found.items():
        if class_map[name] != i:
            raise ValueError(
                f"{where}: class {name!r} has id {i} in the dataset but {class_map[name]} in the class map "
                f"of the training split / checkpoint; the dataset does not match the model"
            )


def build_dataset(
    dataset: str,
    data_dir: str | os.PathLike,
    split: str,
    in_chans: int = 3,
    class_map: Mapping[str, int] | Sequence[str] | None = None,
):
    """``glyphs`` (npz set from ``timm_ext.datasets``), ``""``/``folder`` (ImageFolder ``data_dir/split``,
    split names searched like timm, a missing split is an error) or any timm dataset name
    (e.g. ``torch/cifar100``; never downloads).

    ``class_map`` (``{name: id}`` or names in id order): the ids of the training split or of a checkpoint.
    Folder splits are re-labelled with it (a split may lack classes; unknown folders are an error); other
    datasets must agree with it. Without it, a folder split numbers only the folders it has.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
    cmap = as_class_map(class_map)
    mode = "L" if in_chans == 1 else "RGB"
    if dataset == "glyphs":
        ds = GlyphDataset(data_dir, glyph_split(split), mode=mode)
    elif dataset in ("", "folder", "imagefolder"):
        root = resolve_split_dir(data_dir, split)
        ds = StrictImageDataset(str(root), input_img_mode=mode)
        return ds if cmap is None else apply_class_map(ds, cmap, f"split {split!r} ({root})")
    elif dataset in FOLDER_DATASETS:  # torch/folder: resolve here so timm cannot fall back to data_dir
        root = resolve_split_dir(data_dir, split)
        ds = create_dataset(dataset, root=str(root), split=split, search_split=False, input_img_mode=mode)
        return ds if cmap is None else apply_class_map(ds, cmap, f"split {split!r} ({root})")
    else:
        ds = create_dataset(dataset, root=str(data_dir), split=split, download=False, input_img_mode=mode)
    if cmap is not None:
        check_class_map(ds, cmap, f"split {split!r} of {dataset} ({data_dir})")
    return ds


def stored_class_names(checkpoint: str | os.PathLike, names: Sequence[str] | None) -> list[str] | None:
    """A run's class names in id order: ``names`` (the checkpoint's ``class_names``) or else the run
    folder's ``classes.json``; None when neither has them (then a folder split numbers its own folders)."""
    if names:
        return [str(n) for n in names]
    path = Path(checkpoint).parent / "classes.json"
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get("names")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a classes.json written by mhe-timm-train ({exc})") from exc
    if stored is not None and not (isinstance(stored, list) and all(isinstance(n, str) for n in stored)):
        raise ValueError(f"{path}: 'names' must be a list of strings, got {stored!r:.80}")
    return stored or None


def class_names(ds, num_classes: int) -> list[str] | None:
    """Class names in id order when the dataset knows them (glyph characters, ImageFolder folder names)."""
    names = getattr(ds, "classes", None)
    if names is None:
        mapping = getattr(getattr(ds, "reader", None), "class_to_idx", None)
        if mapping:
            inv = {int(i): str(n) for n, i in mapping.items()}
            names = [inv.get(i) for i in range(max(inv) + 1)]
    if names is None or len(names) != num_classes or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def dataset_targets(ds) -> np.ndarray:
    """All integer targets of a map-style dataset without decoding images."""
    if hasattr(ds, "targets") and ds.targets is not None:
        return np.asarray(ds.targets, dtype=np.int64)
    reader = getattr(ds, "reader", None)
    if reader is not None and hasattr(reader, "samples"):
        return np.asarray([t for _, t in reader.samples], dtype=np.int64)
    inner = getattr(reader, "_dataset", None) or getattr(ds, "dataset", None)
    if inner is not None and hasattr(inner, "targets"):
        return np.asarray(inner.targets, dtype=np.int64)
    raise TypeError(f"cannot read targets of {type(ds).__name__}; pass --num-classes and a map-style dataset")


def item_name(ds, index: int) -> str:
    try:
        return str(ds.filename(index, absolute=True))
    except Exception:
        return f"item {index}"


def infer_num_classes(ds) -> int:
    classes = getattr(ds, "classes", None)
    if classes is None and getattr(ds, "reader", None) is not None:
        classes = getattr(ds.reader, "class_to_idx", None)
    if classes is not None and len(classes):
        return len(classes)
    return int(dataset_targets(ds).max()) + 1


def check_targets(ds, num_classes: int, split: str) -> None:
    """Every class id must be < num_classes: name the first offending item."""
    targets = dataset_targets(ds)
    bad = np.flatnonzero((targets < 0) | (targets >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{split} split: {item_name(ds, i)} has class id {int(targets[i])}, outside [0, {num_classes}) "
            f"(--num-classes {num_classes}); {len(bad)} items are out of range"
        )


def build_loader(
    ds,
    input_size: tuple[int, int, int],
    batch_size: int,
    is_training: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    workers: int = 0,
    distributed: bool = False,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (0.8, 1.25),
    hflip: float = 0.0,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> torch.utils.data.DataLoader:
    """timm ``create_loader`` on CPU-friendly defaults (no prefetcher, no colour jitter, no flips: text)."""
    return create_loader(
        ds,
        input_size=input_size,
        batch_size=batch_size,
        is_training=is_training,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        color_jitter=0.0,
        interpolation=interpolation,
        mean=mean,
        std=std,
        num_workers=workers,
        distributed=distributed,
        crop_pct=crop_pct,
        use_prefetcher=False,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
