"""Crash-injection harness (the ALICE / CrashMonkey idea): kill a trainer before each of its file events,
resume it, and check that what recovery leaves behind is what an uninterrupted run leaves.

Trainers are black boxes: each is run as a subprocess through its CLI, with ``bootstrap/sitecustomize.py``
on the child's PYTHONPATH doing the counting and the killing (see its docstring). So the harness keeps
working whatever the trainers' checkpoint code becomes. What a trainer is (its commands, files, logs) is
described by a :class:`trainers.Trainer`; this module runs scenarios and reports :class:`Failure` rows.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainers import Trainer

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = Path(__file__).resolve().parent / "bootstrap"
TIMEOUT_S = float(os.environ.get("MHE_CRASH_TIMEOUT", "300"))  # a child that hangs fails its scenario


@dataclass
class Event:
    """One file event of a child run, as the bootstrap logged it."""

    n: int
    kind: str
    path: str
    action: str = "pass"

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


@dataclass
class RunResult:
    """How one child process ended and which file events it made."""

    argv: list[str]
    returncode: int
    seconds: float
    events: list[Event]
    output_tail: str

    @property
    def fired(self) -> Event | None:
        return next((e for e in self.events if e.action != "pass"), None)

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def describe(self) -> str:
        """Exit status, the output's last line (the exception, for a traceback), then more of the output."""
        last = self.output_tail.splitlines()[-1] if self.output_tail else ""
        return f"exit {self.returncode} after {self.seconds:.1f}s: {last}\n{self.output_tail}"


@dataclass
class Failure:
    """An invariant that did not hold after a scenario."""

    invariant: str
    details: str


@dataclass
class ScenarioResult:
    """One scenario: kills at ``kills`` (one per successive run), then a clean resume."""

    trainer: str
    kills: list[int]
    mode: str
    events: list[str] = field(default_factory=list)  # the event each kill hit
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        head = f"{self.trainer} N={'+'.join(map(str, self.kills))} ({' | '.join(self.events) or '-'})"
        return [f"{head}: {f.invariant}: {f.details}" for f in self.failures]


def child_env(
    crash_dir: Path | None, at: int = 0, mode: str = "kill", log: Path | None = None
) -> dict[str, str]:
    """The environment of a child run: one thread, the repo importable, and the bootstrap if asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHE_CRASH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if crash_dir is not None:
        paths.insert(0, str(BOOTSTRAP))
        env.update(MHE_CRASH_DIR=str(crash_dir), MHE_CRASH_AT=str(at), MHE_CRASH_MODE=mode)
        if log is not None:
            env["MHE_CRASH_LOG"] = str(log)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_child(
    argv: Sequence[str],
    cwd: Path,
    crash_dir: Path | None = None,
    at: int = 0,
    mode: str = "kill",
    timeout: float = TIMEOUT_S,
    stdin: str = "",
) -> RunResult:
    """Run ``argv``; with ``crash_dir`` the bootstrap counts its events there and acts before event ``at``."""
    log = None
    if crash_dir is not None:
        fd_dir = cwd / ".crash-logs"
        fd_dir.mkdir(parents=True, exist_ok=True)
        log = fd_dir / f"events-{time.monotonic_ns()}.jsonl"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            input=stdin.encode(),
            env=child_env(crash_dir, at, mode, log),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        code, out = proc.returncode, proc.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        code, out = -999, f"timeout after {timeout}s\n" + (exc.output or b"").decode(errors="replace")
    events = []
    if log is not None and log.exists():
        events = [Event(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]
    return RunResult(list(map(str, argv)), code, time.monotonic() - t0, events, _tail(out))


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------ snapshots


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (size, mtime_ns, sha256) of every file under ``root``: what a read-only tool must not change."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            snap[str(p.relative_to(root))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return snap


def diff_snapshots(before: dict, after: dict, allowed: Iterable[str] = ()) -> list[str]:
    """Human-readable differences between two snapshots, ignoring the names in ``allowed``."""
    allowed = set(allowed)
    out = []
    for name in sorted(set(before) | set(after)):
        if name in allowed:
            continue
        a, b = before.get(name), after.get(name)
        if a is None:
            out.append(f"created {name}")
        elif b is None:
            out.append(f"deleted {name}")
        elif a != b:
            what = "content" if a[2] != b[2] else "mtime"
            out.append(f"changed {name} ({what}, {a[0]} -> {b[0]} bytes)")
    return out


def file_set(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ scenarios


@dataclass
class Reference:
    """The uninterrupted run: its output folder and the file events it made (= the kill points)."""

    out: Path
    events: list[Event]
    seconds: float

    @property
    def count(self) -> int:
        return len(self.events)


def reference_run(trainer: Trainer, work: Path) -> Reference:
    """Prepare the trainer's data and run it once to the end, counting its file events."""
    trainer.prepare(work / "data")
    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    out = ref_dir / "out"
    res = run_child(trainer.command(out), ref_dir, crash_dir=out)
    if res.returncode != 0:
        raise RuntimeError(f"{trainer.name}: the reference run failed: {res.describe()}")
    return Reference(out, res.events, res.seconds)


def run_scenario(
    trainer: Trainer, ref: Reference, work: Path, kills: Sequence[int], mode: str = "kill", keep: bool = False
) -> ScenarioResult:
    """Kill the fresh run at ``kills[0]``, each resume at the next kill point, then resume to the end and
    check every invariant. The scenario folder is deleted unless ``keep`` or an invariant failed."""
    t0 = time.monotonic()
    result = ScenarioResult(trainer.name, list(kills), mode)
    sdir = work / f"{mode}-{'-'.join(map(str, kills))}"
    shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True)
    out = sdir / "out"
    fail = result.failures.append
    for i, n in enumerate(kills):
        argv = trainer.command(out) if i == 0 else trainer.resume_command(out)
        run = run_child(argv, sdir, crash_dir=out, at=n, mode=mode)
        hit = run.fired
        result.events.append(str(hit) if hit else ("completed" if run.returncode == 0 else "not reached"))
        if hit is None:
            if run.returncode != 0:
                fail(Failure("crash_run", f"no event {n} reached, yet {run.describe()}"))
                break
            continue  # N beyond this run's events: it finished
        if mode == "kill" and not run.killed:
            fail(Failure("crash_run", f"expected death by SIGKILL at {hit}, got {run.describe()}"))
            break
        if mode == "interrupt" and run.returncode == 0:
            fail(Failure("interrupt_propagates", f"KeyboardInterrupt at {hit} was swallowed: exit 0"))
        if i == 0:
            for inv, details in check_readonly_tools(trainer, out, sdir):
                fail(Failure(inv, details))
    if not any(f.invariant == "crash_run" for f in result.failures):
        final = run_child(trainer.resume_command(out), sdir)
        if final.returncode != 0:
            fail(Failure("resume_ok", final.describe()))
        else:
            for inv, details in check_final(trainer, ref.out, out):
                fail(Failure(inv, details))
    result.seconds = time.monotonic() - t0
    if not keep and not result.failures:
        shutil.rmtree(sdir, ignore_errors=True)
    return result


def check_readonly_tools(trainer: Trainer, out: Path, sdir: Path) -> list[tuple[str, str]]:
    """Run each read-only tool on a copy of the killed run's folder; the copy must not change. (A copy,
    so that what the tool does cannot mask or cause a recovery failure in the real folder.)"""
    problems = []
    for tool in trainer.readonly_tools(out):
        copy = sdir / f"readonly-{tool.name}"
        shutil.rmtree(copy, ignore_errors=True)
        if not out.exists():
            continue
        shutil.copytree(out, copy, symlinks=True)
        argv = tool.argv(copy)
        if argv is None:  # nothing for this tool to read yet
            shutil.rmtree(copy)
            continue
        before = snapshot(copy)
        run = run_child(argv, sdir, stdin=tool.stdin)
        changed = diff_snapshots(before, snapshot(copy), tool.allowed_outputs)
        if run.returncode != 0:
            problems.append((f"readonly:{tool.name}", f"tool failed on the killed run: {run.describe()}"))
        if changed:
            problems.append((f"readonly:{tool.name}", "changed the run folder: " + "; ".join(changed)))
        if not changed and run.returncode == 0:
            shutil.rmtree(copy)
    return problems


def check_final(trainer: Trainer, ref: Path, out: Path) -> list[tuple[str, str]]:
    """Invariants of the recovered run against the uninterrupted one (see :class:`trainers.Trainer`)."""
    from .checks import compare_checkpoints, duplicate_rows, rows_differ

    problems: list[tuple[str, str]] = []
    ref_files, got_files = trainer.run_files(ref), trainer.run_files(out)
    if missing := sorted(ref_files - got_files):
        problems.append(("files_complete", f"missing after recovery: {missing}"))
    if stray := sorted(got_files - ref_files):
        problems.append(("no_stray_files", f"not in the uninterrupted run: {stray}"))
    problems += compare_checkpoints(trainer, ref, out)
    rows = trainer.log_rows(out)
    if dups := duplicate_rows(rows, trainer.log_key):
        problems.append(("log_no_duplicates", f"{trainer.log_name}: rows logged twice: {dups[:5]}"))
    if diff := rows_differ(trainer.log_rows(ref), rows, trainer.timing_keys):
        problems.append(("logs_match_reference", f"{trainer.log_name}: {diff}"))
    try:
        problems += [(inv, d) for inv, d in trainer.consistency(out)]
    except Exception as exc:  # a file the check needs is missing or unreadable
        problems.append(("best_consistent", f"{type(exc).__name__}: {exc}"))
    return problems


# ------------------------------------------------------------------ kill-point selection and reports


def default_seed() -> int:
    """Today's date as a number: the CI subset rotates daily and is reproducible with MHE_CRASH_SEED."""
    return int(os.environ.get("MHE_CRASH_SEED") or datetime.date.today().strftime("%Y%m%d"))


def sample_points(name: str, count: int, k: int, seed: int) -> list[int]:
    """``k`` kill points of ``1..count`` chosen from ``seed`` (and the trainer's name), sorted."""
    rng = random.Random(f"{seed}-{name}")
    return sorted(rng.sample(range(1, count + 1), min(k, count)))


def double_kills(points: Sequence[int], every: int = 6) -> list[tuple[int, int]]:
    """A few two-kill scenarios: kill at N, then kill the resume at one of its early events."""
    return [(n, 1 + (n % 7)) for n in points[::every]]


@dataclass
class TrainerReport:
    """What ``make crash-test`` prints and writes per trainer."""

    trainer: str
    kill_points: int
    scenarios: int = 0
    seconds: float = 0.0
    reference_s: float = 0.0
    held: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    durability_notes: list[str] = field(default_factory=list)  # power-loss issues seen in the trace
    events: list[str] = field(default_factory=list)

    def add(self, res: ScenarioResult, invariants: Sequence[str]) -> None:
        self.scenarios += 1
        bad = {f.invariant.split(":")[0] for f in res.failures}
        for inv in invariants:
            if inv in bad:
                self.failed[inv] = self.failed.get(inv, 0) + 1
            else:
                self.held[inv] = self.held.get(inv, 0) + 1
        for inv in bad - set(invariants):
            self.failed[inv] = self.failed.get(inv, 0) + 1
        self.failures += res.lines()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


INVARIANTS = (
    "crash_run",
    "readonly",
    "resume_ok",
    "files_complete",
    "no_stray_files",
    "weights_equal",
    "state_equal",
    "best_consistent",
    "log_no_duplicates",
    "logs_match_reference",
)


def python(*args: str) -> list[str]:
    """A child command run by this interpreter (the venv's)."""
    return [sys.executable, *args]
