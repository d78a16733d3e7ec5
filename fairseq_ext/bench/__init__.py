"""``python -m fairseq_ext.bench --data-dir DIR``: four NMT output layers on en-de, same model and budget.

Trains the same transformer through fairseq's own CLIs with (1) the standard output layer +
``label_smoothed_cross_entropy``, (2) fairseq's adaptive softmax (``adaptive_loss``), (3) MHP and (4) MHC
(``transformer_mhe --mhe-method mhp|mhc`` + ``mhe_cross_entropy``), at every ``--vocabs`` size (joint
sentencepiece BPE), decodes the full test set with beam 5 (``--required-batch-size-multiple 1``: no
sentence dropped), scores detokenised output with sacreBLEU and chrF against the raw references, and times
the output layers alone at |V| = 8k / 32k / 256k. Writes ``nmt_ende.{json,md,png}``.

Long runs are resumable: each method trains in its own save dir and fairseq continues from
``checkpoint_last.pt``; a method whose ``DONE`` file holds >= ``--max-update`` is not retrained, a decode
newer than its checkpoint is not redone; a larger ``--max-update`` continues training and re-decodes.
A finished method's figures are also kept in ``OUT/runs/NAME/v{V}_{method}.json`` (committed with the
results), keyed by every setting that shapes the run, so a rerun on a fresh machine, whose work dir is gone,
skips it. The report is written after every finished method and says PARTIAL until all are in.

Modules: :mod:`.methods` (what a run is: arguments, run dirs, run keys), :mod:`.runs` (the fairseq CLIs),
:mod:`.timing` (words/s timed alone, the output layers alone), :mod:`.report` (targets, .json/.md/.png),
:mod:`.cli` (the command line and the resumable loop); the run store and report writers are the core's
benchmark kit (:mod:`mhe_plugins.bench`).
"""

from __future__ import annotations

from mhe_plugins.training import atomic_write_json

from .cli import collect_and_report, load_stored, main, run_name, run_store, run_vocab, stored_path
from .methods import (
    METHODS,
    NAMES,
    RUN_KEYS,
    adaptive_cutoffs,
    budgets,
    data_fingerprint,
    for_vocab,
    method_args,
    method_settings,
    method_tag,
    mhc_codec,
    model_args,
    run_dir,
    run_key,
)
from .report import (
    CONVERGED_BITS,
    budget_words,
    convergence,
    markdown,
    mhc_shape,
    plot,
    targets,
    write_report,
)
from .runs import (
    LOG_INTERVAL,
    THREADS,
    generate,
    output_params,
    parse_log,
    preprocess,
    run,
    train,
    train_cmd,
    train_words_and_wall,
)
from .timing import cached_scaling, cached_timings, scaling, time_training

__all__ = [
    "main",
    "atomic_write_json",
    "collect_and_report",
    "load_stored",
    "run_name",
    "run_store",
    "run_vocab",
    "stored_path",
    "METHODS",
    "NAMES",
    "RUN_KEYS",
    "adaptive_cutoffs",
    "budgets",
    "data_fingerprint",
    "for_vocab",
    "method_args",
    "method_settings",
    "method_tag",
    "mhc_codec",
    "model_args",
    "run_dir",
    "run_key",
    "CONVERGED_BITS",
    "budget_words",
    "convergence",
    "markdown",
    "mhc_shape",
    "plot",
    "targets",
    "write_report",
    "LOG_INTERVAL",
    "THREADS",
    "generate",
    "output_params",
    "parse_log",
    "preprocess",
    "run",
    "train",
    "train_cmd",
    "train_words_and_wall",
    "cached_scaling",
    "cached_timings",
    "scaling",
    "time_training",
]
