"""DANN: domain-adversarial training (Ganin & Lempitsky, 2015). Labelled source data
(``data.path``) and unlabelled text from the target domain; a small domain classifier
on the pooled features learns to tell the two apart, and a gradient-reversal layer
between it and the backbone turns its gradient around, so the backbone learns features
the classifier cannot separate while the task head learns the labels.

    graft finetune 'objectives=[{name: dann, weight: 0.1, args: {target_path: target.jsonl}}]'

args (checked before Ray starts, jobs/preflight.py):
- ``target_path``: JSONL/CSV with the text field (``data.text_field``) and no label field
  (the same readers and errors as ``data.path``); required.
- ``target_eval_path``: optional labelled target-domain data (text and label fields,
  labels among the run's), scored at every evaluation beside the source's validation
  split: ``target_eval_loss``, ``target_eval_accuracy``, ... in metrics.jsonl.
- ``hidden``: the domain classifier's width (default 128).
- ``schedule``: ``ganin`` (lambda = 2 / (1 + exp(-10 p)) - 1 over training progress p,
  from 0 to 1) or ``constant``; ``lambda``: its final value (default 1.0).

Each training micro step takes one target micro batch (its own stream, sharded like the
training data and keyed by the micro step, so a resumed run sees the same batches). The
value is the domain classifier's binary cross-entropy on source + target features; the
term also logs ``dann_domain_accuracy`` (near 0.5: the features are aligned) and
``dann_lambda``. The classifier is returned by ``attach``: DeepSpeed trains,
partitions (ZeRO-3) and checkpoints it with the model; the export leaves it out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conf.schema import ConfigError, TermConfig
from jobs.objectives.args import check_keys, is_integer, is_number

ARGS = {"target_path", "target_eval_path", "hidden", "schedule", "lambda"}
SCHEDULES = ("ganin", "constant")


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradientReversal.apply(x, lam)  # type: ignore[no-any-return]


def ganin_lambda(progress: float) -> float:
    """2 / (1 + exp(-10 p)) - 1: 0 at the start, ~1 by the end (Ganin & Lempitsky)."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each sequence's hidden states over its real (non-padding) tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_args(index: int, args: dict[str, Any]) -> None:
    """The args' own values (files are read by preflight)."""
    needed = "dann needs unlabelled target-domain data: a JSONL/CSV file with the text field"
    key = check_keys("dann", index, args, ARGS, {"target_path": needed})
    hidden = args.get("hidden", 128)
    if not is_integer(hidden) or hidden < 1:
        raise ConfigError(f"{key}.hidden", f"must be an integer >= 1, got {hidden!r}")
    if args.get("schedule", "ganin") not in SCHEDULES:
        raise ConfigError(
            f"{key}.schedule", f"{args.get('schedule')!r} is not one of {list(SCHEDULES)}"
        )
    lam = args.get("lambda", 1.0)
    if not is_number(lam) or lam < 0:
        raise ConfigError(f"{key}.lambda", f"must be a number >= 0, got {lam!r}")


def read_target(path: str, data: Any, *, key: str) -> list[dict[str, str]]:
    """The target file's texts ({"text": ...}), read like data.path; a record with the
    label field is refused (the target domain is unlabelled)."""
    from jobs.data import files

    rows = files.read(path, data, (data.text_field,), key=key, forbid=(data.label_field,))
    return [{"text": r[data.text_field]} for r in rows]


def read_target_eval(
    path: str, data: Any, task: Any, labels: list[str] | None, *, key: str
) -> list[dict[str, str]]:
    """The labelled target file's records, read like data.path (labels among the run's)."""
    from jobs import data as data_lib

    records, _ = data_lib.read_extra(path, data, task, key=key, labels=labels)
    return records


class DANN:
    trains_module = True  # (jobs.plan counts its module as trainable parameters)

    def __init__(self, cfg: TermConfig) -> None:
        self.name = cfg.name
        self.weight = cfg.weight
        args = dict(cfg.args)
        self.target_path = str(Path(str(args.get("target_path", ""))).expanduser())
        given = args.get("target_eval_path")
        self.target_eval_path = str(Path(str(given)).expanduser()) if given else None
        self.hidden = int(args.get("hidden", 128))
        self.schedule = str(args.get("schedule", "ganin"))
        self.lam = float(args.get("lambda", 1.0))
        self.model: nn.Module | None = None
        self.classifier: nn.Module | None = None
        self._target: dict[str, torch.Tensor] | None = None
        self._progress = 0.0
        self.metrics: dict[str, torch.Tensor] = {}

    # -- the second data stream (jobs.worker builds it from these) ----------------------
    def stream_records(self, data: Any) -> list[dict[str, str]]:
        return read_target(self.target_path, data, key="objectives.dann.args.target_path")

    def encode(self, records: list[dict[str, str]], tokenizer: Any, data: Any) -> list[Any]:
        ids = tokenizer([r["text"] for r in records], truncation=True, max_length=data.max_length)
        return [{"input_ids": x} for x in ids["input_ids"]]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        from jobs.tasks.common import pad_ids

        return pad_ids(examples, pad_id)

    def eval_sets(self, data: Any, task: Any, labels: list[str] | None) -> dict[str, Any]:
        """Extra evaluation sets by metric prefix (the worker scores them at each eval)."""
        if self.target_eval_path is None:
            return {}
        key = "objectives.dann.args.target_eval_path"
        return {"target_eval": read_target_eval(self.target_eval_path, data, task, labels, key=key)}

    # -- the term --------------------------------------------------------------------
    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        from jobs.models import hidden_size

        self.model = model
        width = hidden_size(model.config)  # type: ignore[arg-type]
        self.classifier = nn.Sequential(
            nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)
        )
        return self.classifier

    def lambda_at(self, progress: float) -> float:
        return self.lam * (ganin_lambda(progress) if self.schedule == "ganin" else 1.0)

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        given: Any = batch.pop(self.name, None)
        if given is None:  # evaluation: no target batch, nothing to add
            self._target = None
            return batch
        stream = dict(given)
        self._progress = float(stream.pop("progress"))
        self._target = stream
        batch["output_hidden_states"] = True  # type: ignore[assignment]
        return batch

    def value(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.model is not None and self.classifier is not None
        if self._target is None:
            raise RuntimeError("dann: a training forward without its target batch")
        target, self._target = self._target, None
        source = masked_mean(outputs.hidden_states[-1], batch["attention_mask"])
        out = self.model(
            input_ids=target["input_ids"],
            attention_mask=target["attention_mask"],
            output_hidden_states=True,
        )
        features = torch.cat([source, masked_mean(out.hidden_states[-1], target["attention_mask"])])
        lam = self.lambda_at(self._progress)
        logits = self.classifier(reverse_gradient(features, lam)).squeeze(-1)
        domain = torch.cat([torch.zeros(len(source)), torch.ones(len(target["input_ids"]))]).to(
            logits
        )
        self.metrics = {
            "dann_domain_accuracy": ((logits > 0).to(domain) == domain).float().mean().detach(),
            "dann_lambda": torch.tensor(lam),
        }
        return F.binary_cross_entropy_with_logits(logits, domain)
