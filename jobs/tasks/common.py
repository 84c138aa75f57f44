"""Pieces the text tasks share: padding to the longest example in a batch."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
# Key train_batches adds to each training example: its epoch's draw (from the seed and
# the epoch), which train-time augmentation seeds from so a resumed run repeats it.
EPOCH_SEED = "epoch_seed"


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads from a batch to score it (token ids and mask, pixel values):
    all but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def pad_ids(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, right-padded to the longest example."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}
