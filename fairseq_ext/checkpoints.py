"""Crash-safe checkpoints for fairseq training (installed by :func:`fairseq_ext.register`).

fairseq writes the first checkpoint of a save atomically (temp + rename) but *copies* it to the others
(``checkpoint_last.pt``, ``checkpoint_best.pt``) with a plain ``shutil.copyfile``: a kill mid-copy leaves a
truncated ``checkpoint_last.pt`` and the next run, which resumes from it by default, dies unpickling it.
Four fixes, all local to ``fairseq.checkpoint_utils``:

- its copies become temp file + fsync + ``os.replace`` (a reader sees the old file or the new one);
- before it loads the default ``checkpoint_last.pt``, the file is test-loaded; if that fails, the newest
  loadable ``checkpoint*.pt`` in the save dir is loaded instead, with a warning naming both files (the
  bad file is left in place and replaced by the next save). No loadable checkpoint at all is an error.
- a checkpoint already at ``--max-update`` ends the run at once (fairseq would train one more update before
  checking, so a kill after the final save made the resumed run differ from an uninterrupted one);
- every ``torch.load`` it makes passes ``weights_only=True`` explicitly: fairseq leaves the argument out,
  so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment would otherwise make it unpickle (and run)
  arbitrary code from a checkpoint file. torch honours an explicit ``weights_only=True`` whatever the
  environment says.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os

import torch

from mhe_plugins.training.atomic import atomic_copy as core_atomic_copy
from mhe_plugins.training.atomic import clean_stale_tmp

logger = logging.getLogger("fairseq_ext.checkpoints")

__all__ = ["atomic_copy", "check_loadable", "fallback_checkpoint", "install"]


def atomic_copy(src: str, dst: str) -> bool:
    """Copy ``src`` to ``dst`` through a temp file in ``dst``'s directory, fsync, then rename (the core's
    atomic copy: a killed copy leaves a ``.mhe-partial`` file that the next start removes)."""
    core_atomic_copy(src, dst)
    return True


def check_loadable(path: str) -> str | None:
    """None if ``path`` unpickles to a fairseq checkpoint (a dict with ``model``), else the reason."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign file, ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(state, dict) or "model" not in state:
        return "not a fairseq checkpoint (no 'model' entry)"
    return None


def fallback_checkpoint(save_dir: str, bad: str) -> str:
    """Newest (by mtime) loadable ``checkpoint*.pt`` in ``save_dir`` other than ``bad``; raise if none."""
    candidates = [
        p
        for p in glob.glob(os.path.join(save_dir, "checkpoint*.pt"))
        if os.path.abspath(p) != os.path.abspath(bad)
    ]
    reasons = []
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        why = check_loadable(path)
        if why is None:
            return path
        reasons.append(f"{path}: {why}")
    raise RuntimeError(
        f"{bad} cannot be loaded ({check_loadable(bad)}) and no other checkpoint in {save_dir} can either"
        + ("".join(f"\n  {r}" for r in reasons) if reasons else " (none found)")
        + "\nMove the save dir away to start from scratch."
    )


class _WeightsOnlyTorch:
    """The ``torch`` module as ``fairseq.checkpoint_utils`` sees it, with ``load`` always weights-only."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, *args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise RuntimeError("refusing weights_only=False: a checkpoint must never run code when loaded")
        kwargs["weights_only"] = True
        return self._inner.load(*args, **kwargs)


class _AtomicCopyPathManager:
    """fairseq's ``PathManager`` with ``copy`` made atomic for local paths; everything else delegated."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if self._inner.path_requires_pathmanager(src_path) or self._inner.path_requires_pathmanager(dst_path):
            return self._inner.copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        return atomic_copy(src_path, dst_path)


def install() -> None:
    """Patch ``fairseq.checkpoint_utils`` (idempotent): atomic copies, recovery of a bad checkpoint_last."""
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils, "_mhe_safe", False):
        return
    checkpoint_utils.PathManager = _AtomicCopyPathManager(checkpoint_utils.PathManager)
    checkpoint_utils.torch = _WeightsOnlyTorch(checkpoint_utils.torch)
    original = checkpoint_utils.load_checkpoint

    def load_checkpoint(cfg, trainer, **passthrough_args):
        if os.path.isdir(cfg.save_dir):  # temp files of copies a kill interrupted (never the only copy)
            clean_stale_tmp(cfg.save_dir, recursive=False)
        last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
        if cfg.restore_file != "checkpoint_last.pt" or not os.path.exists(last):
            return original(cfg, trainer, **passthrough_args)
        why = check_loadable(last)
        if why is None:
            return original(cfg, trainer, **passthrough_args)
        good = fallback_checkpoint(cfg.save_dir, last)
        logger.warning("%s cannot be loaded (%s); resuming from %s instead", last, why, good)
        cfg.restore_file = good
        try:
            return original(cfg, trainer, **passthrough_args)
        finally:
            cfg.restore_file = "checkpoint_last.pt"

    def load_checkpoint_or_finish(cfg, trainer, **passthrough_args):
        out = load_checkpoint(cfg, trainer, **passthrough_args)
        max_update = getattr(getattr(trainer, "cfg", None), "optimization", None)
        max_update = getattr(max_update, "max_update", 0) or 0
        if max_update and trainer.get_num_updates() >= max_update:
            # a kill after the final save: fairseq's loop would train one more update before it checks
            logger.info(
                "training already finished: the checkpoint is at update %d >= --max-update %d; nothing to do",
                trainer.get_num_updates(),
                max_update,
            )
            raise SystemExit(0)
        return out

    checkpoint_utils.load_checkpoint = load_checkpoint_or_finish
    checkpoint_utils._mhe_safe = True
