"""Preemption: SIGTERM, what Kubernetes sends a pod before evicting it (then SIGKILL
after the pod's grace period), asks for a checkpoint at the next step boundary.

- SIGTERM to a worker: the worker's handler (installed in its main thread, where Ray
  runs actor tasks) notes it; at the end of the step every rank agrees (an all-reduce),
  writes a checkpoint and stops. The driver restarts the gang, which resumes from that
  checkpoint (a preemption does not count against ``train.max_failures``).
- SIGTERM to the driver: its handler writes ``<run>/PREEMPT``, which every rank looks
  for at each step boundary; the run checkpoints and stops, and the driver exits 143
  (128 + SIGTERM) saying how to resume.

Either way at most the step in flight is lost.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

MARKER = "PREEMPT"
EXIT_CODE = 128 + signal.SIGTERM

_asked: str | None = None  # this worker process got SIGTERM (set by its handler)


class Preempted(Exception):
    """Raised on every rank of a run that checkpointed and stopped for a preemption."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _asked
    _asked = f"SIGTERM to worker pid {os.getpid()}"


def install_worker_handler() -> int:
    """Run in a Train worker's main thread: SIGTERM then asks for a checkpoint instead
    of ending the process at once. Returns the pid."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    return os.getpid()


def install_in_this_worker() -> None:
    """From the training thread: the handler installed by an actor task on this worker
    (the actor's tasks run in its main thread, the only one that may set handlers)."""
    import ray

    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(install_worker_handler))


def asked(run_dir: Path) -> str | None:
    """Why this run should checkpoint and stop now (None: it should not)."""
    if _asked is not None:
        return _asked
    if (run_dir / MARKER).exists():
        return "SIGTERM to the driver"
    return None


def driver_gone() -> str | None:
    """On a worker of an embedded cluster: why it must stop at once (its driver is
    dead: killed with SIGKILL, its Ray went with it, and the rerun owns the run
    directory now), else None. Workers of a remote cluster have no such driver."""
    from cluster.connect import DRIVER_ENV, identity_alive

    identity = os.environ.get(DRIVER_ENV)
    if not identity or identity_alive(identity):
        return None
    return f"the driver (pid {identity.partition(':')[0]}) is gone"


def exit_if_driver_gone() -> None:
    """Called by every rank before it writes into the run directory: a worker whose
    driver died ends its process here, writing nothing (no metrics line, no checkpoint,
    no exception that a handler could log)."""
    why = driver_gone()
    if why is not None:
        import sys

        sys.stderr.write(f"graft: {why}; worker pid {os.getpid()} stops without writing\n")
        sys.stderr.flush()
        os._exit(1)


def clear(run_dir: Path) -> None:
    """A new session of the run: a marker left by an earlier preempted driver is done."""
    (run_dir / MARKER).unlink(missing_ok=True)


@contextmanager
def on_driver_sigterm(run_dirs: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """While inside: SIGTERM to this (driver) process marks the runs for preemption
    (``state["signalled"]`` becomes True) instead of killing it. The marker is written
    at once by a thread woken through the signal's wakeup fd: the main thread, blocked
    in Ray's fit, would run a Python handler only a second or so later (steps lost)."""
    state: dict[str, Any] = {"signalled": False}

    def mark() -> None:
        if state["signalled"]:
            return
        state["signalled"] = True
        for d in run_dirs:
            if d.is_dir():
                (d / MARKER).touch()
        print("graft: SIGTERM: checkpointing at the next step boundary, then stopping", flush=True)

    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: mark())
    except ValueError:  # not the main thread (a test driving run() from a thread)
        yield state
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            ready, _, _ = select.select([reader], [], [], 0.5)
            if ready and signal.SIGTERM in reader.recv(64):
                mark()

    watcher = threading.Thread(target=watch, daemon=True, name="graft-sigterm")
    watcher.start()
    try:
        yield state
    finally:
        done.set()
        watcher.join()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, previous)
        reader.close()
        writer.close()
