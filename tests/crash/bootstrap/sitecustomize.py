"""Crash injection for a child trainer process (put this folder on the child's PYTHONPATH only).

Why a ``sitecustomize``: it runs before the trainer's own code in every Python process (``python -m``,
console scripts, ``fairseq-train``), so the trainer stays a black box. A ``sys.addaudithook`` sees every
file mutation Python makes; only those under ``MHE_CRASH_DIR`` are counted, so torch/timm caches and temp
files do not shift the kill points. ``os.fsync`` has no audit event and ``torch.save(obj, "path")`` writes
from C++, so both are wrapped as extra events.

Environment (all read once at start-up):
  MHE_CRASH_DIR   the run's output folder (events elsewhere are ignored); unset = bootstrap inactive
  MHE_CRASH_AT    N >= 1: act right *before* the N-th event; 0: only count
  MHE_CRASH_MODE  ``kill`` (SIGKILL itself, no cleanup) or ``interrupt`` (KeyboardInterrupt, in the main
                  thread as a real Ctrl-C: raised there, or sent there from a background thread)
  MHE_CRASH_LOG   JSON-lines file receiving one row per event (``n``, ``kind``, ``path``, ``action``)
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ACTIVE_VAR = "MHE_CRASH_ACTIVE_PID"


class _Injector:
    """Counts file events under one folder and kills (or interrupts) the process at the chosen one."""

    def __init__(self, root: str, at: int, mode: str, log: str | None) -> None:
        self.roots = tuple({os.path.abspath(root), os.path.realpath(root)})
        self.at, self.mode, self.pid = at, mode, os.getpid()
        self.n = 0
        self.lock = threading.Lock()
        self.local = threading.local()
        self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log else None

    def rel(self, path: Any) -> str | None:
        """``path`` relative to the run folder, or None when it lies outside (or is an fd)."""
        if isinstance(path, int) or path is None:
            return None
        try:
            p = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        full = os.path.abspath(p)
        for root in self.roots:
            if full == root or full.startswith(root + os.sep):
                return os.path.relpath(full, root)
        return None

    def fd_rel(self, fd: int) -> str | None:
        try:
            return self.rel(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return None

    def event(self, kind: str, *paths: str | None) -> None:
        """Called for every candidate event; acts when one of ``paths`` is inside the run folder."""
        if os.getpid() != self.pid or getattr(self.local, "busy", False):
            return
        inside = [p for p in paths if p is not None]
        if not inside:
            return
        self.local.busy = True
        try:
            with self.lock:
                self.n += 1
                n = self.n
            hit = self.at > 0 and n == self.at
            action = self.mode if hit else "pass"
            if self.log_fd is not None:
                row = {"n": n, "kind": kind, "path": " -> ".join(inside), "action": action}
                os.write(self.log_fd, (json.dumps(row) + "\n").encode())
            if hit:
                if self.mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if threading.current_thread() is threading.main_thread():
                    raise KeyboardInterrupt(f"mhe crash injection: interrupt at file event {n} ({kind})")
                # Ctrl-C reaches only the main thread (e.g. not a TensorBoard writer thread): deliver it
                # there, as SIGINT would, and let this thread's operation go on
                _thread.interrupt_main()
        finally:
            self.local.busy = False

    def resolve(self, path: Any, dir_fd: Any = None) -> str | None:
        """Like :meth:`rel` for a path relative to ``dir_fd`` (how ``shutil.rmtree`` unlinks)."""
        if isinstance(dir_fd, int) and dir_fd >= 0 and path is not None and not isinstance(path, int):
            try:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
                return self.rel(os.path.join(base, os.fsdecode(os.fspath(path))))
            except (OSError, TypeError):
                return None
        if isinstance(path, int):
            return self.fd_rel(path)
        return self.rel(path)

    def audit(self, name: str, args: tuple) -> None:
        if name == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes:
                self.event("open", self.rel(path))
        elif name == "os.rename":  # os.replace too
            src, dst, src_fd, dst_fd = (tuple(args) + (None,) * 4)[:4]
            self.event("rename", self.resolve(src, src_fd), self.resolve(dst, dst_fd))
        elif name in ("os.link", "os.symlink"):
            self.event(name[3:], self.rel(args[1]))
        elif name in ("os.remove", "os.rmdir", "shutil.rmtree"):
            path, dir_fd = (tuple(args) + (None, None))[:2]
            self.event(name.split(".")[1], self.resolve(path, dir_fd))
        elif name == "os.truncate":
            self.event("truncate", self.resolve(args[0]))
        elif name == "os.mkdir":
            path, _, dir_fd = (tuple(args) + (None,) * 3)[:3]
            rel = self.resolve(path, dir_fd)
            full = os.path.normpath(os.path.join(self.roots[0], rel)) if rel is not None else None
            # exist_ok on an existing folder, or a parents=True probe under a missing one: nothing changes
            if full is not None and not os.path.isdir(full) and os.path.isdir(os.path.dirname(full)):
                self.event("mkdir", rel)
        if "torch" in sys.modules and not getattr(self, "torch_wrapped", False):
            self.wrap_torch_save()

    def wrap_torch_save(self) -> None:
        """``torch.save`` to a path opens the file in C++ (no audit event): count it as an event."""
        torch = sys.modules["torch"]
        real = getattr(torch, "save", None)
        if real is None:  # torch is still importing: try again at the next event
            return
        self.torch_wrapped = True
        injector = self

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, (str, bytes, os.PathLike)):
                injector.event("torch.save", injector.rel(f))
            return real(obj, f, *args, **kwargs)

        torch.save = save
        serialization = sys.modules.get("torch.serialization")
        if serialization is not None and getattr(serialization, "save", None) is real:
            serialization.save = save

    def wrap_fsync(self) -> None:
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name, None)
            if real is None:
                continue

            def synced(fd: Any, _real: Any = real, _name: str = name) -> None:
                num = fd if isinstance(fd, int) else fd.fileno()
                self.event(_name, self.fd_rel(num))
                return _real(fd)

            setattr(os, name, synced)


def _chain_original() -> None:
    """Run the sitecustomize this one shadows (e.g. a distribution's), so the child behaves as usual."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _install() -> None:
    root = os.environ.get("MHE_CRASH_DIR")
    if not root or os.environ.get(_ACTIVE_VAR):  # inactive, or a grandchild: only the first process counts
        return
    os.environ[_ACTIVE_VAR] = str(os.getpid())
    mode = os.environ.get("MHE_CRASH_MODE", "kill")
    if mode not in ("kill", "interrupt"):
        raise SystemExit(f"MHE_CRASH_MODE must be kill or interrupt, got {mode!r}")
    injector = _Injector(
        root, int(os.environ.get("MHE_CRASH_AT", "0")), mode, os.environ.get("MHE_CRASH_LOG")
    )
    if mode == "interrupt":  # a harness started in the background (`cmd &`) inherits SIGINT ignored,
        signal.signal(signal.SIGINT, signal.default_int_handler)  # which would make Ctrl-C a no-op
    injector.wrap_fsync()
    sys.addaudithook(injector.audit)


_install()
_chain_original()
