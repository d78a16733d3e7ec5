"""The commit protocol of a run folder: one commit point, roll-forward recovery, nothing ever deleted.

A run folder holds ``last`` (everything needed to resume: the commit point) and ``best`` (the weights that
scored best on validation). :meth:`TrainState.commit` writes ``last`` first; when the best changed since the
previous commit, ``last`` also carries the new best state, and ``best`` is written from it afterwards. So a
kill at any moment leaves one of two states:

* ``best`` matches the commit (the normal case), or
* ``best`` is older than the commit (killed between the two writes): the committed best is inside ``last``,
  and :meth:`TrainState.recover` (trainer only) rolls ``best`` forward from it, while the read-only
  :meth:`TrainState.load_best` returns it from ``last`` without writing anything.

Every commit carries a counter (``_commit``) so "older" and "newer" never depend on a trainer's own epoch or
step numbering. Recovery never deletes: an unreadable ``last`` is reported together with what is still
usable, and resuming from it is refused (:class:`RunDamagedError`) instead of starting over. Folders written
by the previous protocol (``best.pt.prev``) are repaired by renaming, never by unlinking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save
from .checkpoint import load_checkpoint

__all__ = ["TrainState", "RunStatus", "FileStatus", "RunDamagedError", "NothingToResumeError"]

COMMIT = "_commit"  # commit counter, in last and best
BEST_COMMIT = "_best_commit"  # in last: the commit whose best state best.pt must hold
BEST_STATE = "_best_state"  # in last, only on the commit that produced a new best


class RunDamagedError(RuntimeError):
    """The commit point of a run is unreadable; the message says what is still usable."""


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was asked for but the folder holds no committed state."""


@dataclass(frozen=True)
class FileStatus:
    """What one checkpoint file is: absent, unreadable (with why) or readable at a commit / position."""

    path: Path
    exists: bool
    error: str | None = None
    commit: int | None = None  # the commit counter (None for files of the previous protocol)
    position: int | None = None  # the trainer's own key (epoch or step), for messages
    best_commit: int | None = None  # last only
    has_best_state: bool = False  # last only

    @property
    def ok(self) -> bool:
        return self.exists and self.error is None

    def order(self) -> int | None:
        """Comparable age: the commit counter, else (previous protocol) the position."""
        return self.commit if self.commit is not None else self.position


@dataclass(frozen=True)
class RunStatus:
    """A read-only diagnosis of a run folder (see :meth:`TrainState.status`)."""

    last: FileStatus
    best: FileStatus
    key: str
    legacy_prev: Path | None = None

    @property
    def best_is_stale(self) -> bool:
        """``best`` is absent, unreadable or older than the best the commit names."""
        if not self.last.ok or self.last.best_commit is None:
            return False
        return not self.best.ok or self.best.commit is None or self.best.commit < self.last.best_commit

    @property
    def best_rollable(self) -> bool:
        """The committed best lives inside ``last`` (so a stale ``best`` can be rebuilt from it)."""
        return self.best_is_stale and self.last.has_best_state

    @property
    def best_uncommitted(self) -> bool:
        """``best`` is newer than the commit: only a kill under the previous protocol leaves this."""
        if not (self.last.ok and self.best.ok):
            return False
        b, c = self.best.order(), self.last.order()
        if self.best.commit is not None and self.last.best_commit is not None:
            return self.best.commit > self.last.best_commit
        return b is not None and c is not None and b > c

    def _describe(self, f: FileStatus) -> str:
        if not f.exists:
            return f"{f.path.name} is missing"
        if f.error:
            return f"{f.path.name} is damaged ({f.error})"
        return f"{f.path.name} from {self.key} {f.position} is intact"

    def describe(self) -> str:
        """One line a user can act on, e.g. 'last.pt is damaged (...); best.pt from epoch 3 is intact'."""
        parts = [self._describe(self.last), self._describe(self.best)]
        if self.best_rollable:
            parts.append(f"{self.last.path.name} holds the newer committed best")
        if self.best_uncommitted:
            parts.append(
                f"{self.best.path.name} is newer than the last commit (an interrupted older version)"
            )
        return "; ".join(parts)


def _inspect(path: Path, key: str) -> FileStatus:
    if not path.is_file():
        return FileStatus(path, exists=path.exists(), error="not a file" if path.exists() else None)
    try:
        state = load_checkpoint(path, mmap=True)
    except Exception as exc:  # truncated, foreign, needs code: all "unreadable"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return FileStatus(path, exists=True, error=msg.replace(f"cannot load checkpoint {path}: ", ""))
    if not isinstance(state, dict):
        return FileStatus(path, exists=True, error=f"holds a {type(state).__name__}, not a checkpoint dict")
    pos = state.get(key)
    return FileStatus(
        path,
        exists=True,
        commit=_int_or_none(state.get(COMMIT)),
        position=_int_or_none(pos),
        best_commit=_int_or_none(state.get(BEST_COMMIT)),
        has_best_state=state.get(BEST_STATE) is not None,
    )


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


class TrainState:
    """``last`` + ``best`` in ``directory`` under the commit protocol of the module docstring.

    ``key`` names the trainer's own position entry (``"epoch"``, ``"step"``) used in messages and to order
    files written before commit counters existed.
    """

    def __init__(
        self, directory: str | os.PathLike, last: str = "last.pt", best: str = "best.pt", key: str = "epoch"
    ):
        self.dir = Path(directory)
        self.last, self.best, self.key = self.dir / last, self.dir / best, key
        self.legacy_prev = self.dir / f"{best}.prev"
        self._commit = 0
        self._best_commit: int | None = None

    # ------------------------------------------------------------------ read-only
    def status(self) -> RunStatus:
        """Diagnose the folder without writing anything."""
        prev = self.legacy_prev if self.legacy_prev.exists() else None
        return RunStatus(_inspect(self.last, self.key), _inspect(self.best, self.key), self.key, prev)

    def load_best(self, map_location: str | torch.device = "cpu") -> tuple[dict, str | None]:
        """(the committed best state, a note when it did not come from ``best`` as is). Writes nothing.

        A ``best`` left behind by a kill is replaced by the committed best inside ``last``; a damaged
        ``last`` does not stop a readable ``best`` from loading (the note says so).
        """
        st = self.status()
        if st.best_rollable:
            state = load_checkpoint(self.last, map_location)[BEST_STATE]
            return state, (
                f"{self.best.name} is older than the last commit ({st.describe()}); using the committed best "
                f"stored in {self.last.name} (the next training run with --resume rewrites {self.best.name})"
            )
        if not st.best.ok:
            raise RunDamagedError(f"{self.dir}: cannot load the best weights: {st.describe()}")
        note = None
        if st.last.exists and not st.last.ok:
            note = f"{st.describe()}: evaluating {self.best.name}"
        elif st.best_uncommitted:
            note = f"{st.describe()}: evaluating {self.best.name} as it is"
        return load_checkpoint(self.best, map_location), note

    # ------------------------------------------------------------------ trainer side
    def recover(self) -> list[str]:
        """Roll forward what a kill left half-done (trainer only, under the run lock); returns what it did.

        Never deletes: a stale ``best`` is rewritten from the committed best inside ``last``; a ``best`` of
        the previous protocol newer than the commit is renamed aside and its ``.prev`` restored. A damaged
        ``last`` is left as it is (:meth:`load_resume` reports it).
        """
        st = self.status()
        notes: list[str] = []
        if st.best_rollable:
            state = load_checkpoint(self.last, "cpu")[BEST_STATE]
            atomic_save(state, self.best)
            notes.append(f"rewrote {self.best.name} from the committed best in {self.last.name}")
        elif st.best_uncommitted and st.legacy_prev is not None:
            aside = self.dir / f"{self.best.name}.uncommitted"
            os.replace(self.best, aside)
            os.replace(st.legacy_prev, self.best)
            notes.append(
                f"{self.best.name} was newer than the last commit: kept it as {aside.name} and restored "
                f"{self.best.name} from {st.legacy_prev.name}"
            )
        return notes

    def load_resume(self, path: str | os.PathLike | None = None, map_location: Any = "cpu") -> dict:
        """The committed state to resume from (``path`` defaults to ``last``).

        Raises :class:`NothingToResumeError` when there is nothing, :class:`RunDamagedError` (naming what is
        still usable) when it is unreadable: resuming never silently starts over.
        """
        target = Path(path) if path is not None else self.last
        f = _inspect(target, self.key)
        if not f.exists:
            raise NothingToResumeError(
                f"nothing to resume: {target} does not exist (start without the resume flag for a new run; "
                f"add the overwrite flag if the folder keeps files of a run killed before its first commit)"
            )
        if not f.ok:
            what = (
                self.status().describe() if target == self.last else f"{target.name} is damaged ({f.error})"
            )
            raise RunDamagedError(
                f"cannot resume from {target}: {what}. Nothing was changed; copy the intact files elsewhere "
                f"or start a new run in another folder"
            )
        state = load_checkpoint(target, map_location)
        state.pop(BEST_STATE, None)
        self._commit = int(state.get(COMMIT, 0) or 0)
        self._best_commit = _int_or_none(state.get(BEST_COMMIT))
        return state

    def commit(self, last_state: Mapping[str, Any], best_state: Mapping[str, Any] | None = None) -> int:
        """Commit ``last_state`` (and a new ``best_state``): ``last`` first, then ``best``; returns the commit
        number. Both writes are atomic; a kill between them is repaired forward (module docstring)."""
        self._commit += 1
        last = dict(last_state)
        last[COMMIT] = self._commit
        if best_state is not None:
            best = dict(best_state)
            best[COMMIT] = self._commit
            self._best_commit = self._commit
            last[BEST_STATE] = best
        last[BEST_COMMIT] = self._best_commit
        atomic_save(last, self.last)  # the commit point
        if best_state is not None:
            atomic_save(best, self.best)
        return self._commit
