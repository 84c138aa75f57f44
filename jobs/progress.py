"""Live progress on the driver: follow a run's metrics.jsonl and show it with rich.

The workers write metrics.jsonl (rank 0); the driver only reads it, so progress
works the same for an embedded cluster and, over shared storage, a remote one.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _describe(record: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("eval_loss", "eval_loss {:.4f}"),
        ("eval_accuracy", "eval_acc {:.3f}"),
        ("tokens_per_s", "{:.0f} tok/s"),
        ("examples_per_s", "{:.0f} ex/s"),
    ):
        if key in record:
            parts.append(fmt.format(record[key]))
        if key == "tokens_per_s" and key in record:
            break  # text: tokens/s says it (examples/s is in metrics.jsonl)
    return "  ".join(parts)


class Tail:
    """The records appended to a metrics.jsonl since the last ``read``. A resume rewrites
    the file (``RunLog.truncate_after``: a new file renamed over the old one, shorter):
    a new inode or a shorter file means reading it again from the start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_ino != self.inode or stat.st_size < self.offset:
                    self.inode, self.offset = stat.st_ino, 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # (a line still being written waits)
        self.offset += len(complete)
        records = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # (only a display: a damaged line is skipped, never fatal)
        return records


@contextmanager
def follow(metrics_path: Path, *, total_steps: int, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
    task = progress.add_task("train", total=total_steps, info="starting workers...")
    stop = threading.Event()
    seen: dict[str, Any] = {}

    tail = Tail(metrics_path)

    def poll() -> None:
        while not stop.wait(0.5):
            for record in tail.read():
                seen.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
                progress.update(task, completed=record.get("step", 0), info=_describe(seen))

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
