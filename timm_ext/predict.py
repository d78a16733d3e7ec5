"""``mhe-timm-predict``: the top-k classes (names and probabilities) of image files under a ``mhe-timm-train``
checkpoint, as CSV (timm ``inference.py``'s columns) or JSON, to stdout or ``--output FILE``.

Why not timm's ``inference.py``: it takes the top-k of B x N softmax scores; this runs the head's exact
top-k (MHP product decode, MHC beam search) and never builds them. Preprocessing is the evaluation
transform ``mhe-timm-validate`` applies (the checkpoint's input size, mean, std, interpolation, crop_pct),
so both give the same prediction for the same image. Read-only on the run folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions

from mhe_plugins.training import atomic_write_text

from .data import stored_class_names
from .run_files import RUN_FILES
from .validate import eval_loader, load_model

FORMATS = ("csv", "json")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for timm's image extensions (sorted); in argument order."""
    exts = {e.lower() for e in get_img_extensions(as_set=True)}
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
            if not files:
                raise FileNotFoundError(f"no images ({', '.join(sorted(exts))}) found under {path}")
            found += files
        else:
            raise FileNotFoundError(f"image file or folder not found: {path}")
    if not found:
        raise ValueError("no image files or folders given")
    return found


class ImageFiles(torch.utils.data.Dataset):
    """``(image, -1)`` per file, in the given order; timm's ``create_loader`` sets ``transform``."""

    def __init__(self, files: Sequence[Path], mode: str):
        self.files, self.mode, self.transform = list(files), mode, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image {path} is too large to decode safely: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise ValueError(f"corrupt or unreadable image {path}: {exc}") from exc
        return (self.transform(img) if self.transform is not None else img), -1


@torch.no_grad()
def predict(
    paths: Sequence[str | Path],
    checkpoint: str | Path,
    top_k: int = 5,
    batch_size: int = 256,
    workers: int = 0,
) -> list[dict]:
    """One record per image: ``filename``, top-k ``ids``, ``names`` and ``probs`` (best first)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    files = find_images(paths)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    names = stored_class_names(checkpoint, model.class_names)
    k = min(top_k, cfg["num_classes"])
    ds = ImageFiles(files, "L" if cfg["input_size"][0] == 1 else "RGB")
    loader = eval_loader(ds, cfg, batch_size, workers)
    records: list[dict] = []
    for x, _ in loader:
        feats = model.pooled(x.to(device))
        scores, ids = model.head.topk(feats, k)
        if cfg["head"] == "mhs":  # MHS top-k values are logits: normalise over all N (MHS is full anyway)
            scores = model.head.log_prob(feats).gather(1, ids)
        # exact probabilities of the returned ids (MHS and linear top-k values are logits, not log-probs)
        scores = torch.stack([model.head.target_log_prob(feats, ids[:, j]) for j in range(ids.shape[1])], 1)
        for row_ids, row_lp in zip(ids.tolist(), scores.exp().tolist()):
            f = files[len(records)]
            labels = [names[i] if names else str(i) for i in row_ids]
            records.append({"filename": str(f), "ids": row_ids, "names": labels, "probs": row_lp})
    return records


def to_csv(records: list[dict]) -> str:
    """timm ``inference.py --results-separate-col --include-index``: filename, index_i, label_i, prob_i."""
    k = len(records[0]["ids"]) if records else 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [f"{c}_{i}" for c in ("index", "label", "prob") for i in range(k)]
    w.writerow(["filename", *cols])
    for r in records:
        w.writerow([r["filename"], *r["ids"], *r["names"], *r["probs"]])
    return buf.getvalue()


def to_json(records: list[dict], checkpoint: str | Path) -> str:
    return (
        json.dumps({"checkpoint": str(checkpoint), "predictions": records}, indent=1, ensure_ascii=False)
        + "\n"
    )


def _check_output(output: Path, checkpoint: Path) -> None:
    """Never write over the checkpoint or a run file: predicting must leave the run folder as it was."""
    out = output.resolve()
    if out == checkpoint.resolve() or (out.parent == checkpoint.resolve().parent and out.name in RUN_FILES):
        raise ValueError(f"--output {output} would overwrite a file of the run in {checkpoint.parent}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mhe-timm-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument(
        "--checkpoint", required=True, help="a mhe-timm-train checkpoint (OUT/best.pt, OUT/last.pt)"
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", default="csv", choices=FORMATS)
    p.add_argument("--output", default=None, metavar="FILE", help="write here instead of stdout")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.output:
        _check_output(Path(a.output), Path(a.checkpoint))
    records = predict(a.images, a.checkpoint, a.top_k, a.batch_size, a.workers)
    text = to_csv(records) if a.format == "csv" else to_json(records, a.checkpoint)
    if a.output:
        atomic_write_text(text, Path(a.output))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
