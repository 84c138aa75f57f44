"""Tasks: what differs between classification, causal LM (and next: seq2seq, image
classification, zero-shot scoring), behind one small protocol. Picked by ``model.task``.

    python -c "from jobs import tasks; print(sorted(tasks.TASKS))"

A task knows which Auto class to build (and what it must set on the HF config), which
record fields a data file needs, how records become token ids and batches, the training
loss, the summed evaluation statistics, and an example batch for ``graft plan`` and
``jobs.memprobe``. Nothing outside this folder branches on the task.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from conf.schema import DataConfig, ModelConfig
from jobs.tasks import causal_lm, image_classification, seq2seq, sequence_classification


class Task(Protocol):
    name: str
    # peft's task type for LoRA, and whether the model has a new head trained in full.
    peft_task_type: str  # "" = none (a plain PeftModel)
    new_head: bool
    # What the model reads: "text" (a tokenizer) or "image" (an image processor).
    modality: str
    # The model form it needs, a Family flag ("causal_lm", "encoder_decoder"; "" = any).
    needs: str
    # Evaluation also generates (``generation_sums``: exact match, ROUGE-L).
    generates: bool

    def auto_class(self, config: Any, labels: list[str] | None) -> Any:
        """The transformers Auto class; sets what the HF config needs (label map)."""

    def fields(self, data: DataConfig) -> tuple[str, ...]:
        """The record fields a data file must have (configured names)."""

    def labels(
        self, records: list[dict[str, str]], data: DataConfig
    ) -> tuple[list[dict[str, str]], list[str] | None]:
        """Records kept and the label list (None for tasks without labels)."""

    def encode(
        self, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
    ) -> list[dict[str, Any]]: ...

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's keys the model reads to score it (evaluation, a teacher)."""

    def scored_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows of ``logits`` the loss scores, one per prediction: [N, classes]
        (a teacher's and a student's line up row for row, for distillation)."""

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One flat float64 tensor of sums that all-reduce: [loss, count, correct, ...]."""

    def metrics(
        self, sums: torch.Tensor, prefix: str, *, confusion: bool = False
    ) -> dict[str, Any]:
        """``{prefix}_loss``, ``{prefix}_accuracy``, ... from the reduced sums."""

    def describe_input(self, length: int) -> str:
        """``input_size``'s value in words: "512 tokens", "224x224 images"."""

    def input_size(self, model: ModelConfig, data: DataConfig) -> int:
        """The length ``example_batch`` takes: tokens (data.max_length), or the image
        side preprocessing gives."""

    def example_batch(
        self,
        *,
        batch_size: int,
        seq_len: int,
        vocab: int,
        num_labels: int,
        device: Any = None,
        generator: Any = None,
    ) -> dict[str, torch.Tensor]:
        """A batch of this shape: random ids (or zeros on the meta device, for tracing)."""


class Generating(Task, Protocol):
    """A task whose evaluation also generates (``generates`` is true)."""

    def generation_sums(
        self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any, *, max_new_tokens: int
    ) -> torch.Tensor:
        """Only where ``generates``: per example sums of generated outputs, [B, k]."""


TASKS: dict[str, Task] = {
    "sequence_classification": sequence_classification.TASK,
    "causal_lm": causal_lm.TASK,
    "image_classification": image_classification.TASK,
    "seq2seq": seq2seq.TASK,
}

# data.task (the record format) -> the model task that trains on it.
_FOR_DATA = {
    "classification": "sequence_classification",
    "image_classification": "image_classification",
    "instruction": "causal_lm",
    "text": "causal_lm",
}


def get(model: ModelConfig | str) -> Task:
    name = model if isinstance(model, str) else model.task
    if name not in TASKS:
        raise ValueError(f"model.task: {name!r} is not one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def for_labels(labels: torch.Tensor) -> Task:
    """The text task a batch's labels belong to: one per example (classification) or
    one per token (causal LM). For scoring plain models outside a run."""
    return TASKS["sequence_classification" if labels.dim() == 1 else "causal_lm"]


def for_examples(examples: list[dict[str, Any]]) -> Task:
    """The task encoded examples belong to (see ``encode``)."""
    if "image" in examples[0]:
        return TASKS["image_classification"]
    return TASKS["sequence_classification" if "label" in examples[0] else "causal_lm"]


def for_data(data: DataConfig) -> Task:
    """The task a data format trains (a dataset read without a model config)."""
    return TASKS[_FOR_DATA[data.task]]
