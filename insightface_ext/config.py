"""arcface_torch-style python configs: a module that builds ``config`` from :func:`base_config` and overrides it.

``head_sizes`` replaces Partial FC's ``sample_rate`` (which is still accepted: it adds random negative groups).
``load_config("ms1mv3_r50_mhs")`` loads a bundled config, ``load_config("path/to/my.py")`` a user file.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

__all__ = ["base_config", "load_config", "apply_overrides", "check_types", "BUNDLED"]

BUNDLED = Path(__file__).parent / "configs"


def base_config() -> SimpleNamespace:
    """Defaults shared by every config (the values of arcface_torch's ``configs/base.py`` where they exist)."""
    return SimpleNamespace(
        network="r50",  # r18/r34/r50/r100 or "timm:NAME"
        width=64,  # IResNet channel width (64 = published nets)
        embedding_size=512,
        input_size=112,
        in_chans=3,
        dropout=0.0,
        margin_list=(1.0, 0.5, 0.0),  # (m1, m2, m3): ArcFace
        scale=64.0,
        head_sizes=None,  # e.g. (13, 7187); None -> the balanced 2-head split (LabelCodec.from_spec)
        sample_rate=None,  # optional extra random negative groups (Partial-FC style)
        fp16=False,  # AMP (float16 autocast + GradScaler) on CUDA only
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=128,  # per process
        lr=0.1,
        num_epoch=20,
        warmup_epoch=0,
        max_steps=None,  # stop early (smoke runs)
        clip_grad=5.0,
        rec="",  # dir with train.rec/.idx, an ImageFolder dir, or glyphs:DIR[:split]
        num_classes=None,  # identities; None -> from the dataset
        num_image=None,  # informational (arcface_torch uses it for the schedule); checked if given
        val_targets=(),  # names of <rec>/<name>.bin or paths to .bin files
        val_image_size=None,  # defaults to input_size
        output="work_dirs/face",
        seed=2048,
        num_workers=2,
        verbose=2000,  # verification every `verbose` steps (and at each epoch end)
        save_every=1000,  # checkpoint every N steps (and at each epoch end)
        log_every=50,
        resume=True,  # continue the run in `output` (the default); False needs overwrite=True over a run
        overwrite=False,  # with resume=False: delete the run files in `output` and start over
        tensorboard=True,  # TensorBoard scalars next to train_log.jsonl (docs/logging.md)
        log_dir=None,  # their folder; None -> <output>/tensorboard (arcface_torch's place)
        wandb=False,  # also send them to Weights & Biases (needs wandb installed)
        wandb_project=None,
    )


def load_config(name_or_path: str) -> SimpleNamespace:
    """Run a config module and return its ``config``; unknown keys are an error naming the file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = BUNDLED / f"{name_or_path}.py"
    if not path.is_file():
        bundled = sorted(p.stem for p in BUNDLED.glob("*.py") if not p.stem.startswith("_"))
        raise FileNotFoundError(f"config {name_or_path!r} not found (bundled configs: {bundled})")
    spec = importlib.util.spec_from_file_location(f"mhe_face_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = getattr(mod, "config", None)
    if not isinstance(cfg, SimpleNamespace):
        raise ValueError(
            f"{path}: must define `config = base_config()` (a SimpleNamespace), got {type(cfg).__name__}"
        )
    unknown = sorted(set(vars(cfg)) - set(vars(base_config())))
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    check_types(cfg, str(path))
    cfg.config_path = str(path)
    return cfg


_NUMBER = (int, float)


def check_types(cfg: SimpleNamespace, source: str) -> None:
    """Every key whose default is a bool / int / float / str / tuple must hold that type (ints are fine
    for floats, lists for tuples); keys defaulting to None take anything. The error names key and value."""
    for key, default in vars(base_config()).items():
        value = getattr(cfg, key, default)
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, _NUMBER) and not isinstance(value, bool)
            if ok:
                setattr(cfg, key, float(value))
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(
                f"{source}: config key {key!r} must be {type(default).__name__}, got {value!r} "
                f"({type(value).__name__})"
            )


def apply_overrides(cfg: SimpleNamespace, overrides: list[str]) -> SimpleNamespace:
    """``key=value`` strings (values parsed with ``ast.literal_eval``, else kept as str)."""
    known = set(vars(base_config()))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"bad override {item!r}: expected key=value with key in {sorted(known)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        setattr(cfg, key, value)
        check_types(cfg, f"--set {item}")
    return cfg
