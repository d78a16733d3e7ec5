"""What a benchmark records about the machine and its threads, and the thread settings it gives children.

Why: timings are only comparable with the machine, the thread count and the load they were taken under;
every bench records them the same way. And on a shared CPU, OpenMP spin-waiting with more threads than
free cores made runs ~10x slower, so every child process gets an explicit thread count.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = [
    "machine",
    "load_avg",
    "boot_id",
    "environment",
    "thread_env",
    "set_threads",
    "mem_available_bytes",
]


def machine() -> str:
    """One line naming the machine and the torch build, e.g. ``x86_64, 2 CPUs, torch 2.14.1``."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def load_avg() -> float:
    """The 1-minute load average now: a timing is only comparable with others taken under the same load."""
    return round(os.getloadavg()[0], 2)


def boot_id() -> str:
    """This boot of this machine ("" where unknown): runs with the same id shared one machine state, so
    their speeds compare; our machines change between work sessions, with the same CPU name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where unknown)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def environment(threads: int = 0) -> dict:
    """The figures every report keeps beside its timings (``threads`` 0 = torch's current count)."""
    return {
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "machine": machine(),
        "load_avg_at_start": load_avg(),
        "cpu_model": cpu_model(),
        "boot_id": boot_id(),
    }


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process limited to ``threads`` intra-op threads (OpenMP and MKL)."""
    n = str(max(1, int(threads)))
    return {**(os.environ if base is None else base), "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads in this process (0 = leave torch's default); returns the count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (0 where unknown): a run that cannot fit is skipped or capped."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
