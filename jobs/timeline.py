"""Where a run's start-up goes: named moments, as seconds from the command's start.

The driver marks its own (``preflight``, ``ray``, ``fit``) and hands them to the
workers; each worker adds its own (``worker_process``: when Ray made the process,
``train_fn``: when Ray Train entered graft's loop, then ``data``, ``model``, ``engine``)
and rank 0 writes them all in the run's start record as ``startup``, and the first
step's time as ``first_step`` in the step-1 record. ``graft finetune`` counts from the
command's own process start (the Python interpreter and imports included); a run
started in-process counts from ``finetune.run``'s call.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Set by the CLI to its process's start: then every mark counts from the command.
COMMAND_STARTED: float | None = None


def process_started() -> float:
    """When this process was created (the interpreter's start, before any import), on
    time.time()'s clock. On Linux from the process's start tick and the uptime (10 ms):
    psutil's create_time adds the boot time, which the kernel gives in whole seconds,
    so it can be up to 1 s off the wall clock."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return float(psutil.Process().create_time())


class Marks:
    """Named wall-clock moments, kept in order."""

    def __init__(self, given: dict[str, float] | None = None) -> None:
        self.at: dict[str, float] = dict(given or {})

    def mark(self, name: str, at: float | None = None) -> None:
        self.at[name] = time.time() if at is None else at

    def since(self, origin: float) -> dict[str, float]:
        """Each mark as seconds from ``origin``, in the order they happened."""
        return {k: round(v - origin, 2) for k, v in sorted(self.at.items(), key=lambda kv: kv[1])}
