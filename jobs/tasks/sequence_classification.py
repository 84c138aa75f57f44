"""sequence_classification: a new head of len(labels) outputs on a pretrained backbone.

    graft finetune data=jsonl data.path=tickets.jsonl data.labels=[bug,feature,question]

Records are {text, label}; the loss is cross-entropy over the labels. Evaluation sums
the loss, the count, the correct predictions and the confusion matrix, which all-reduce
across ranks; accuracy and macro-F1 come from those sums.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from conf.schema import ConfigError, DataConfig
from jobs.tasks.common import model_inputs, pad_ids


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro-averaged F1 from a confusion matrix (rows: true, columns: predicted), over
    the classes that occur as a true or a predicted label (scikit-learn's default)."""
    c = confusion.double()
    tp = c.diag()
    support = c.sum(1) + c.sum(0)  # 2tp + fn + fp
    present = support > 0
    if not present.any():
        return 0.0
    f1 = torch.where(present, 2 * tp / support.clamp(min=1), torch.zeros_like(tp))
    return float(f1[present].mean())


class SequenceClassification:
    name = "sequence_classification"
    peft_task_type = "SEQ_CLS"
    new_head = True
    modality = "text"
    needs = ""
    generates = False

    def auto_class(self, config: Any, labels: list[str] | None) -> Any:
        if not labels:
            raise ValueError("build: a classification model needs its label list")
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        return AutoModelForSequenceClassification

    def fields(self, data: DataConfig) -> tuple[str, ...]:
        return (data.text_field, data.label_field)

    def labels(
        self, records: list[dict[str, str]], data: DataConfig
    ) -> tuple[list[dict[str, str]], list[str] | None]:
        if data.num_classes is not None:
            counts = Counter(r["label"] for r in records).most_common(data.num_classes)
            keep = {label for label, _ in counts}
            records = [r for r in records if r["label"] in keep]
        if data.labels is not None:
            allowed = set(data.labels)
            for i, r in enumerate(records, start=1):
                if r["label"] not in allowed:
                    raise ConfigError(
                        "data.labels",
                        f"example {i} has label {r['label']!r}, not in the label set {data.labels}",
                    )
            labels = list(data.labels)
        else:
            labels = sorted({r["label"] for r in records})
        if len(labels) < 2:
            raise ConfigError(
                "data.path", f"classification needs at least 2 labels, found {labels}"
            )
        return records, labels

    def encode(
        self, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
    ) -> list[dict[str, Any]]:
        assert labels is not None
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({r["label"] for r in records} - set(index))
        if unknown:
            raise ConfigError(
                "data.labels", f"labels {unknown} are not in the training label set {labels}"
            )
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=data.max_length)[
            "input_ids"
        ]
        return [
            {"input_ids": ids, "label": index[r["label"]]}
            for ids, r in zip(enc, records, strict=True)
        ]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_ids(examples, pad_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs.loss

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch)

    def scored_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits  # one row per example

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        num_labels = logits.size(-1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        predicted = logits.argmax(-1)
        confusion = torch.bincount(
            labels * num_labels + predicted, minlength=num_labels * num_labels
        )
        head = torch.stack(
            [
                loss.detach(),
                torch.tensor(float(labels.numel())),
                (predicted == labels).sum().float(),
            ]
        )
        return torch.cat([head.double(), confusion.double()])

    def metrics(
        self, sums: torch.Tensor, prefix: str, *, confusion: bool = False
    ) -> dict[str, Any]:
        loss, count, correct = sums[:3].tolist()
        num_labels = round(math.sqrt(sums.numel() - 3))
        matrix = sums[3:].reshape(num_labels, num_labels).round().long()
        out: dict[str, Any] = {
            f"{prefix}_loss": loss / count,
            f"{prefix}_accuracy": correct / count,
            f"{prefix}_macro_f1": macro_f1(matrix),
        }
        if confusion:
            out[f"{prefix}_confusion"] = matrix.tolist()
        return out

    def describe_input(self, length: int) -> str:
        return f"{length} tokens"

    def input_size(self, model: Any, data: DataConfig) -> int:
        return data.max_length

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
        if device is not None and torch.device(device).type == "meta":
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
            return {
                "input_ids": ids,
                "labels": torch.zeros(batch_size, dtype=torch.long, device=device),
            }
        ids = torch.randint(4, vocab, (batch_size, seq_len), generator=generator)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }


TASK = SequenceClassification()
