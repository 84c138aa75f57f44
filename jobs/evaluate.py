"""Evaluation: the task's summed statistics over this rank's batches, reduced over ranks.

The same code scores an exported model in plain transformers, so the number logged at
the end of training can be checked against the export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from jobs import tasks


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, count, correct, ...] for a batch: per example for classification
    (labels (B,)), per target token for language modelling (labels (B, T))."""
    return tasks.for_labels(labels).eval_sums(logits, labels)


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads from a batch (token ids and mask, or pixel values)."""
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    forward: Callable[..., Any],
    batches: Iterable[tuple[dict[str, torch.Tensor], bool]],
    *,
    task: Any = None,
    prefix: str = "eval",
    confusion: bool = False,
    per_example: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``{prefix}_loss``, ``{prefix}_accuracy`` and the task's other metrics.
    ``per_example``: also append each counted example's own sums, in this rank's order
    (summing any subset and calling ``task.metrics`` scores that subset: bootstraps)."""
    totals: torch.Tensor | None = None
    for batch, counts in batches:
        task = task or tasks.for_labels(batch["labels"])
        out = forward(**inputs(batch))
        sums = task.eval_sums(out.logits, batch["labels"])
        totals = (sums if counts else torch.zeros_like(sums)) + (0 if totals is None else totals)
        if per_example is not None and counts:
            per_example.extend(
                task.eval_sums(out.logits[i : i + 1], batch["labels"][i : i + 1])
                for i in range(batch["labels"].size(0))
            )
    assert totals is not None and task is not None, "evaluate: no batches"
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return task.metrics(totals, prefix, confusion=confusion)
