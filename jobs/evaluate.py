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


@torch.no_grad()
def evaluate(
    forward: Callable[..., Any],
    batches: Iterable[tuple[dict[str, torch.Tensor], bool]],
    *,
    task: Any = None,
    prefix: str = "eval",
    confusion: bool = False,
    per_example: list[torch.Tensor] | None = None,
    generate: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``{prefix}_loss``, ``{prefix}_accuracy`` and the task's other metrics.
    ``per_example``: also append each counted example's own sums, in this rank's order
    (summing any subset and calling ``task.metrics`` scores that subset: bootstraps).
    ``generate``: per-example sums of generated outputs for a batch ([B, k]: exact
    match, ROUGE-L, ... for tasks that generate), appended to the task's sums."""
    totals: torch.Tensor | None = None
    for batch, counts in batches:
        task = task or tasks.for_labels(batch["labels"])
        out = forward(**task.model_inputs(batch))
        generated = generate(batch) if generate is not None else None  # (collective)
        sums = task.eval_sums(out.logits, batch["labels"])
        if generated is not None:
            sums = torch.cat([sums, generated.sum(0).double()])
        totals = (sums if counts else torch.zeros_like(sums)) + (0 if totals is None else totals)
        if per_example is not None and counts:
            for i in range(batch["labels"].size(0)):
                own = task.eval_sums(out.logits[i : i + 1], batch["labels"][i : i + 1])
                if generated is not None:
                    own = torch.cat([own, generated[i].double()])
                per_example.append(own)
    assert totals is not None and task is not None, "evaluate: no batches"
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return task.metrics(totals, prefix, confusion=confusion)
