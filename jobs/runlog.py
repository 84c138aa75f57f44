"""The run directory's metrics: ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

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
KEPT = ("failure", "preempted", "checkpoint_skipped")


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self._tb: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

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
        record = {**record, "time": time.time()}  # wall clock: lets tools time a run from outside
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    self._tb.add_scalar(f"{key}/{sub}", v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
