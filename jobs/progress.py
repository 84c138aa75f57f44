"""Live progress on the driver: follow a run's metrics.jsonl and show it with rich.

The workers write metrics.jsonl (rank 0); the driver only reads it, so progress
works the same for an embedded cluster and, over shared storage, a remote one.
"""

from __future__ import annotations

import json
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

    def poll() -> None:
        offset = 0
        while not stop.wait(0.5):
            if not metrics_path.is_file():
                continue
            with metrics_path.open() as f:
                f.seek(offset)
                chunk = f.read()
            if not chunk.endswith("\n"):
                continue  # a line still being written
            offset += len(chunk)
            for line in chunk.splitlines():
                record = json.loads(line)
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
