"""One metrics logger for every trainer: the JSON-lines rows, the same numbers as TensorBoard scalars, and
W&B when asked for.

Why one class: a resumed run must show every step once in every sink. ``log.jsonl`` drops the rows logged
after the resumed checkpoint (:meth:`JsonlLogger.truncate`). TensorBoard cannot delete points, so the
resumed run's event file starts with ``SummaryWriter(purge_step=S)``, S = the first step it will log again;
TensorBoard's readers then discard every older point at step >= S. A row reaches TensorBoard as one event
(all its scalars), written and flushed right after its JSON line, so a kill loses at most that row.
"""

from __future__ import annotations

import argparse
import re
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .logs import JsonlLogger, _to_jsonable

__all__ = ["MetricLogger", "TB_SUBDIR", "add_metric_log_args", "open_metric_logger", "numeric_tags"]

#: the TensorBoard folder inside a run's output folder, for every trainer (arcface_torch's convention)
TB_SUBDIR = "tensorboard"

TagsOf = Callable[[Mapping[str, Any]], Mapping[str, float]]
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def numeric_tags(row: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Every top-level number of ``row`` (not bools, not ``skip``) under its own key: the default tags."""
    out = {}
    for key, value in row.items():
        value = _to_jsonable(value)
        if key not in skip and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class MetricLogger(JsonlLogger):
    """A :class:`JsonlLogger` that also writes each row's scalars to TensorBoard (and W&B) at the row's
    ``step_key`` value. ``tags_of(row)`` names the scalars (default: the row's numbers under their keys);
    ``log(row, extra=...)`` adds scalars that are not part of the JSON row (e.g. throughput)."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        step_key: str,
        enabled: bool = True,
        tb_dir: str | Path | None = None,
        tags_of: TagsOf | None = None,
        wandb: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__(path, enabled)
        self.step_key = step_key
        self.tags_of = tags_of or (lambda row: numeric_tags(row, skip=(step_key,)))
        self.tb_dir = Path(tb_dir) if (tb_dir is not None and self.enabled) else None
        self.purge_step = 0  # a new run hides any older points in its folder; truncate() moves it
        self._writer: Any = None
        self._wandb = _WandbRun(wandb_project, run_name, config) if (wandb and self.enabled) else None
        if self.tb_dir is not None:
            _import_summary_writer()  # fail before training, not at the first row

    def log(self, record: Mapping[str, Any], extra: Mapping[str, float] | None = None) -> None:
        """Append the JSON row, then its scalars (plus ``extra``) at step ``record[step_key]``."""
        super().log(record)
        if not self.enabled or (self.tb_dir is None and self._wandb is None):
            return
        if self.step_key not in record:
            raise KeyError(f"metric row has no {self.step_key!r} (its TensorBoard step): {sorted(record)}")
        step = int(_to_jsonable(record[self.step_key]))
        scalars = {k: float(v) for k, v in {**self.tags_of(record), **(extra or {})}.items()}
        if self.tb_dir is not None:
            self._write_tb(step, scalars)
        if self._wandb is not None:
            self._wandb.log(step, scalars)

    def truncate(self, keep: Callable[[dict], bool]) -> int:
        """Drop the JSON rows ``keep`` refuses (on resume) and purge TensorBoard from the step after the
        last kept row (0 when none is kept), so what TensorBoard shows is what ``log.jsonl`` holds."""
        dropped = super().truncate(keep)
        if self.enabled:
            steps = [int(r[self.step_key]) for r in self.read() if self.step_key in r]
            self.purge_step = max(steps) + 1 if steps else 0
            self._close_sinks()  # the next row opens a new event file (and W&B run) from there
        return dropped

    def close(self) -> None:
        """Flush and close the event file and end the W&B run (the event file is also closed when the
        logger is garbage-collected; W&B ends its runs at exit)."""
        self._close_sinks()

    def _write_tb(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            self._writer = _open_writer(self.tb_dir, self.purge_step)
            self._finalizer = weakref.finalize(self, self._writer.close)
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        # one event per row (a kill cannot split a row); SummaryWriter has no public call for several
        # scalars in one event (add_scalars makes one sub-run per tag), hence its file writer
        values = [v for tag, x in scalars.items() for v in scalar(tag, x).value]
        self._writer._get_file_writer().add_summary(Summary(value=values), step, time.time())
        self._writer.flush()  # on disk before training goes on (as the JSON line is)

    def _close_sinks(self) -> None:
        if self._writer is not None:
            self._finalizer()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            f"TensorBoard logging needs the tensorboard package ({exc}): pip install tensorboard "
            "(it comes with the [timm], [xmc] and [face] extras), or turn it off (--no-tensorboard, "
            "tensorboard=False in a face config)"
        ) from exc
    return SummaryWriter


def _open_writer(tb_dir: Path, purge_step: int):
    """A SummaryWriter whose event file sorts after every older one in ``tb_dir``: readers apply files in
    name order (the name starts with the creation second), and the purge must come after what it purges."""
    tb_dir.mkdir(parents=True, exist_ok=True)
    newest = max((int(m[1]) for p in tb_dir.iterdir() if (m := _EVENT_FILE.match(p.name))), default=-1)
    deadline = time.time() + 2.0  # a clock that went back further than this is not waited for
    while int(time.time()) <= newest and time.time() < deadline:
        time.sleep(0.05)
    return _import_summary_writer()(log_dir=str(tb_dir), purge_step=purge_step)


class _WandbRun:
    """W&B, optional: imported only when asked for, started at the first row. W&B cannot delete points,
    so every start (fresh or resumed) is its own W&B run, grouped under the output folder's name."""

    def __init__(self, project: str | None, name: str | None, config: Mapping[str, Any] | None):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(
                "--wandb needs the wandb package (pip install wandb; it is not a dependency of mhe-plugins)"
            ) from exc
        self.wandb, self.project, self.name, self.config = wandb, project, name, dict(config or {})
        self.run: Any = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.run is None:
            self.run = self.wandb.init(
                project=self.project,
                name=self.name,
                group=self.name,
                config={**self.config, "start_step": step},
            )
        self.run.log(dict(scalars), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def add_metric_log_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The logging options every trainer's CLI shares: ``--log-dir``, ``--no-tensorboard``, ``--wandb``,
    ``--wandb-project``."""
    parser.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help=f"TensorBoard event folder (default: OUTPUT/{TB_SUBDIR}); the JSON-lines log stays in OUTPUT",
    )
    parser.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="write no TensorBoard event files (the JSON-lines log is always written)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also send the scalars to Weights & Biases (off by default; needs `pip install wandb`)",
    )
    parser.add_argument("--wandb-project", default=None, help="W&B project (default: W&B's own default)")


def open_metric_logger(
    path: str | Path,
    output: str | Path,
    options: Any,
    *,
    step_key: str,
    enabled: bool,
    tags_of: TagsOf | None = None,
    config: Mapping[str, Any] | None = None,
) -> MetricLogger:
    """The run's logger from a trainer's options (``tensorboard``, ``log_dir``, ``wandb``, ``wandb_project``
    attributes of an argparse namespace, dataclass or config; missing = the defaults)."""
    log_dir = getattr(options, "log_dir", None)
    tb_dir = (
        (Path(log_dir) if log_dir else Path(output) / TB_SUBDIR)
        if getattr(options, "tensorboard", True)
        else None
    )
    return MetricLogger(
        path,
        step_key=step_key,
        enabled=enabled,
        tb_dir=tb_dir,
        tags_of=tags_of,
        wandb=bool(getattr(options, "wandb", False)),
        wandb_project=getattr(options, "wandb_project", None),
        run_name=Path(output).resolve().name,
        config=config,
    )
