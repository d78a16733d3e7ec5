"""``mhe-fairseq-{train,generate,interactive,preprocess}``: register the plugin, then run fairseq's CLI.

All arguments are forwarded untouched, so these behave exactly like ``fairseq-train`` etc. with the MHE
model/criterion available and no ``--user-dir`` needed (passing it anyway is harmless: same module).
"""

from __future__ import annotations

import sys

from fairseq_ext import register


def _run(module: str, argv: list[str] | None) -> None:
    import importlib

    # fairseq_cli modules call logging.basicConfig at import: import first so logs keep fairseq's format
    cli = importlib.import_module(f"fairseq_cli.{module}")
    register()
    if argv is not None:
        sys.argv = [f"mhe-fairseq-{module}", *argv]
    cli.cli_main()


def train_main(argv: list[str] | None = None) -> None:
    _run("train", argv)


def generate_main(argv: list[str] | None = None) -> None:
    _run("generate", argv)


def interactive_main(argv: list[str] | None = None) -> None:
    _run("interactive", argv)


def preprocess_main(argv: list[str] | None = None) -> None:
    _run("preprocess", argv)


def score_main(argv: list[str] | None = None) -> None:
    _run("score", argv)
