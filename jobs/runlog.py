"""The run directory's metrics: ``metrics.jsonl`` (one JSON object per line), and the
experiment trackers of ``run.loggers`` (jobs/trackers.py: TensorBoard by default).

Written by rank 0 only. On resume, lines past the checkpoint's step are dropped so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
# One row of eval sums per example of a split (the sweep's paired bootstrap reads them).
EXAMPLE_SUMS = "example_sums_{split}.pt"


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part: written to a
    file of this process's own beside it, then renamed over it. Two sweep drivers that
    finish together write the same summary and report files while the other reads them."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# Fields of a record that are not metrics (the summary line leaves them out).
BOOKKEEPING = ("time", "train_time_s", "startup_s", "time_to_first_step_s")
# What happened to the run itself stays through a resume's truncation.
KEPT = ("failure", "preempted", "checkpoint_skipped", "tracker_failed")


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool, cfg: Any = None) -> None:
        """``cfg`` (a FinetuneConfig) starts its ``run.loggers``; without it, TensorBoard."""
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.trackers: Any = None
        if enabled:
            from jobs import trackers

            if cfg is None:
                self.trackers = trackers.Trackers.tensorboard_only(Path(run_dir))
            else:
                self.trackers = trackers.Trackers(Path(run_dir), cfg, on_failure=self._failed)

    def _failed(self, tracker: str, message: str) -> None:
        self._write({"event": "tracker_failed", "tracker": tracker, "error": message})

    def reset(self) -> None:
        """A run that starts from step 0 again (no complete checkpoint) starts a fresh file."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int, *, phase: int = 0) -> None:
        """Keep what came before a checkpoint at ``step`` written in ``phase``: a later
        phase's start logged at that same step came after it."""
        if self.enabled and self.path.is_file():
            kept = [
                r
                for r in read(self.path.parent)
                if r.get("event") in KEPT
                or r.get("step", 0) <= step
                and r.get("event") not in ("end", "cancelled")
                and not (r.get("event") == "phase" and r.get("phase", 0) > phase)
            ]
            # a new file renamed over the old one: a reader (jobs.progress) sees either
            fresh = self.path.with_suffix(".jsonl.tmp")
            fresh.write_text("".join(json.dumps(r) + "\n" for r in kept))
            fresh.replace(self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = self._write(record)
        self.trackers.log(record)

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "time": time.time()}  # wall clock: lets tools time a run from outside
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def artifact(self, path: Path, name: str) -> None:
        """A folder the trackers keep with the run (the export)."""
        if self.enabled:
            self.trackers.artifact(path, name)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
