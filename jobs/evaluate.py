"""Evaluation: summed loss and accuracy over this rank's batches, reduced over ranks.

The same ``loss_sums`` scores an exported model in plain transformers, so the number
logged at the end of training can be checked against the export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.data import IGNORE_INDEX


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed loss, count, correct]: per example for classification (labels (B,)),
    per target token for language modelling (labels (B, T), shifted here)."""
    logits = logits.float()
    if labels.dim() == 1:
        loss = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        count = labels.numel()
    else:
        logits, labels = logits[:, :-1], labels[:, 1:]  # token t predicts token t+1
        mask = labels != IGNORE_INDEX
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        correct = ((logits.argmax(-1) == labels) & mask).sum()
        count = int(mask.sum())
    return torch.stack([loss.detach(), torch.tensor(float(count)), correct.float()])


@torch.no_grad()
def evaluate(
    forward: Callable[..., Any], batches: Iterable[tuple[dict[str, torch.Tensor], bool]]
) -> dict[str, float]:
    totals = torch.zeros(3)
    for batch, counts in batches:
        out = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if counts:
            totals += loss_sums(out.logits, batch["labels"])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss, count, correct = totals.tolist()
    return {"eval_loss": loss / count, "eval_accuracy": correct / count}
