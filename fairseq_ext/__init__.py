"""fairseq plugin: ``--arch transformer_mhe`` (MHP or MHC output layer) + ``--criterion mhe_cross_entropy``.

Two ways in, both registering the same modules exactly once:
- ``fairseq-train ... --user-dir $(python -m fairseq_ext)``: fairseq imports this package by its directory
  name (``fairseq_ext``, the same name it is installed under, so no second copy is ever registered);
- ``mhe-fairseq-train ...`` (and -generate/-interactive/-preprocess): :mod:`fairseq_ext.cli` calls
  :func:`register` and hands all arguments to fairseq's own entry point.
Importing the package without fairseq loaded (e.g. ``python -m fairseq_ext.datasets``) registers nothing.
"""

from __future__ import annotations

import os
import sys

__all__ = ["register", "USER_DIR"]

USER_DIR = os.path.dirname(os.path.abspath(__file__))


def register() -> None:
    """Register ``transformer_mhe*``, ``mhe_cross_entropy`` and ``adaptive_label_smoothed_loss`` with fairseq
    (idempotent)."""
    import argparse

    import torch

    # fairseq (legacy-args models) pickles an argparse.Namespace into every checkpoint; torch>=2.6 loads with
    # weights_only=True. Allow just that class, so loading stays safe for untrusted files.
    torch.serialization.add_safe_globals([argparse.Namespace])
    from . import adaptive_criterion, checkpoints, criterion, model  # noqa: F401  (registration at import)

    checkpoints.install()  # atomic checkpoint copies; recover from a truncated checkpoint_last.pt


if "fairseq" in sys.modules:  # imported by fairseq's --user-dir (or after fairseq): register now
    register()
