"""Multi-task learning: more labelled classification tasks on the run's backbone, each
with its own head, data file and loss weight, beside the run's own task.

    graft finetune 'objectives=[{name: multitask, args: {tasks: {topic: {path: topic.jsonl,
        weight: 0.5}, tone: {path: tone.jsonl}}, sampling: temperature, temperature: 2}}]'

The run's own task (data.path, its head or LM head) trains every step; each extra task
is a classification head of the model's family (the family's own sequence
classification model, e.g. BertForSequenceClassification or
LlamaForSequenceClassification) whose backbone *is* the run's backbone (the same module,
so its weights are shared and ZeRO-3 partitions them once). loss = task loss +
weight x sum over the micro step's extra tasks of w_t x loss_t.

args (checked before Ray starts, jobs/preflight.py):
- ``tasks``: name -> ``{path, weight}``: a JSONL/CSV with the text and label fields
  (data.text_field / data.label_field), read like data.path, its own label set;
  ``weight`` w_t (default 1). Names: letters, digits, ``_`` and ``-``.
- ``sampling``: which extra tasks a micro step trains: ``all`` (every one), or one drawn
  with probability proportional to n_t (``proportional``, the default), 1 (``uniform``)
  or n_t^(1/T) (``temperature``, ``temperature`` T > 0, default 2), n_t being the
  task's number of training examples. The draw is seeded by the micro step: every
  worker (and a resumed run) draws the same task.
- ``eval_fraction``: the share of each task's file held out for its evaluation (0.2).

Each task's micro batches are their own stream (sharded like the training data, keyed
by the micro step). At every evaluation each task's held-out part is scored with its
head: ``eval_loss/<task>``, ``eval_accuracy/<task>``, ``eval_macro_f1/<task>``, and
``eval_accuracy/mean`` over the run's task and the extra ones. The export writes
``export/tasks/<task>/``: a plain transformers sequence classification model per task
(the shared backbone and its head, with the tokenizer and labels.json).
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conf.schema import ConfigError, TermConfig
from jobs.objectives.args import check_keys, is_number

ARGS = {"tasks", "sampling", "temperature", "eval_fraction"}
TASK_ARGS = {"path", "weight"}
SAMPLING = ("proportional", "uniform", "temperature", "all")
NAME = re.compile(r"[A-Za-z0-9_-]+")
# A batch routed to a task's head (evaluation): batch[ROUTE] = (term name, task name).
ROUTE = "route"
EXPORT_DIR = "tasks"


def check_args(index: int, args: dict[str, Any]) -> None:
    needed = "multitask needs tasks: {name: {path: <labelled JSONL/CSV>, weight: <w>}}"
    key = check_keys("multitask", index, args, ARGS, {"tasks": needed})
    tasks = args["tasks"]
    if not isinstance(tasks, dict):
        raise ConfigError(f"{key}.tasks", needed)
    for name, task in tasks.items():
        where = f"{key}.tasks.{name}"
        if not NAME.fullmatch(str(name)):
            raise ConfigError(where, "a task name is letters, digits, _ and - only")
        if not isinstance(task, dict) or not task.get("path"):
            raise ConfigError(f"{where}.path", "each task needs its labelled data file")
        unknown = sorted(set(task) - TASK_ARGS)
        if unknown:
            raise ConfigError(where, f"a task takes {sorted(TASK_ARGS)}, got unknown {unknown}")
        weight = task.get("weight", 1.0)
        if not is_number(weight) or weight < 0:
            raise ConfigError(f"{where}.weight", f"must be a number >= 0, got {weight!r}")
    if args.get("sampling", "proportional") not in SAMPLING:
        raise ConfigError(
            f"{key}.sampling", f"{args.get('sampling')!r} is not one of {list(SAMPLING)}"
        )
    temperature = args.get("temperature", 2.0)
    if not is_number(temperature) or temperature <= 0:
        raise ConfigError(f"{key}.temperature", f"must be a number > 0, got {temperature!r}")
    fraction = args.get("eval_fraction", 0.2)
    if not is_number(fraction) or not 0 < fraction < 1:
        raise ConfigError(f"{key}.eval_fraction", f"must be in (0, 1), got {fraction!r}")


def read_task(
    path: str, data: Any, *, key: str, eval_fraction: float
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """A task's (train, eval) records and its sorted label list, split with data.split_seed."""
    from jobs.data import files

    rows = files.read(path, data, (data.text_field, data.label_field), key=key)
    records = [{"text": r[data.text_field], "label": r[data.label_field]} for r in rows]
    labels = sorted({r["label"] for r in records})
    if len(labels) < 2:
        raise ConfigError(key, f"a classification task needs at least 2 labels, found {labels}")
    order = list(range(len(records)))
    random.Random(data.split_seed).shuffle(order)
    cut = max(1, round(len(order) * eval_fraction))
    if len(order) - cut < 1:
        raise ConfigError(key, f"{len(records)} examples leave none for training")
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]], labels


def task_head(model: Any, labels: list[str], seed: int) -> nn.Module:
    """The family's sequence classification model for ``labels``, its backbone replaced
    by ``model``'s (the same module: shared weights)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same head on every rank
        head = AutoModelForSequenceClassification.from_config(config)
    prefix = str(model.base_model_prefix)
    if not hasattr(head, prefix) or not hasattr(model, prefix):
        raise ConfigError(
            "objectives.multitask",
            f"{type(model).__name__} and {type(head).__name__} do not share a backbone",
        )
    setattr(head, prefix, getattr(model, prefix))
    return head.to(next(model.parameters()).dtype)


class MultiTask:
    def __init__(self, cfg: TermConfig) -> None:
        args = dict(cfg.args)
        self.name = cfg.name
        self.weight = cfg.weight
        tasks = dict(args.get("tasks") or {})
        self.paths = {str(k): str(Path(str(v["path"])).expanduser()) for k, v in tasks.items()}
        self.task_weights = {str(k): float(v.get("weight", 1.0)) for k, v in tasks.items()}
        self.sampling = str(args.get("sampling", "proportional"))
        self.temperature = float(args.get("temperature", 2.0))
        self.eval_fraction = float(args.get("eval_fraction", 0.2))
        self.labels: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.heads: nn.ModuleDict | None = None
        self._held_out: dict[str, list[dict[str, Any]]] = {}
        self._chosen: dict[str, dict[str, torch.Tensor]] = {}
        self.metrics: dict[str, torch.Tensor] = {}

    # -- data: a stream per task, and each task's evaluation ---------------------------
    def _read(self, task: str, data: Any) -> tuple[list[Any], list[Any], list[str]]:
        key = f"objectives.multitask.args.tasks.{task}.path"
        return read_task(self.paths[task], data, key=key, eval_fraction=self.eval_fraction)

    def encode_task(
        self, task: str, records: list[dict[str, str]], tokenizer: Any, data: Any
    ) -> list[dict[str, Any]]:
        index = {label: i for i, label in enumerate(self.labels[task])}
        ids = tokenizer([r["text"] for r in records], truncation=True, max_length=data.max_length)
        return [
            {"input_ids": x, "label": index[r["label"]]}
            for x, r in zip(ids["input_ids"], records, strict=True)
        ]

    def task_streams(self, data: Any, tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
        """Each task's encoded training examples (the worker streams them); the held-out
        parts are kept for ``task_evals``."""
        streams, self._held_out = {}, {}
        for task in self.paths:
            train, held_out, labels = self._read(task, data)
            self.labels[task], self.sizes[task] = labels, len(train)
            streams[task] = self.encode_task(task, train, tokenizer, data)
            self._held_out[task] = self.encode_task(task, held_out, tokenizer, data)
        return streams

    def task_evals(self, data: Any, tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
        """Each task's encoded held-out examples (after ``task_streams``)."""
        if not self._held_out:
            self.task_streams(data, tokenizer)
        return dict(self._held_out)

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        from jobs.tasks.common import pad_ids

        batch = pad_ids(examples, pad_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def probabilities(self) -> dict[str, float]:
        """Each task's chance of being drawn for a micro step (``sampling``)."""
        power = {"proportional": 1.0, "uniform": 0.0}.get(self.sampling, 1.0 / self.temperature)
        mass = {t: float(self.sizes.get(t, 1)) ** power for t in self.paths}
        total = sum(mass.values())
        return {t: m / total for t, m in mass.items()}

    def draw(self, progress: float) -> list[str]:
        """The micro step's tasks: all, or one drawn with a seed from the micro step."""
        if self.sampling == "all":
            return list(self.paths)
        rng = random.Random(round(progress * 2**40))
        tasks, weights = zip(*self.probabilities().items(), strict=True)
        return rng.choices(list(tasks), weights=list(weights))

    # -- the term --------------------------------------------------------------------
    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        if context.data is not None and context.tokenizer is not None and not self.labels:
            for task in self.paths:
                _, _, self.labels[task] = self._read(task, context.data)
        heads = nn.ModuleDict()
        for i, task in enumerate(self.paths):
            labels = self.labels.get(task) or ["a", "b"]  # (jobs.memprobe: any 2 labels)
            heads[task] = task_head(model, labels, seed=1000 + i)
        self.heads = heads
        return heads

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        given = {
            k.split("/", 1)[1]: batch.pop(k) for k in list(batch) if k.startswith(self.name + "/")
        }
        self._chosen = {}
        if given:
            progress = float(next(iter(given.values()))["progress"])
            for task in self.draw(progress):
                self._chosen[task] = {k: v for k, v in given[task].items() if k != "progress"}
        return batch

    def value(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.heads is not None
        if not self._chosen:
            raise RuntimeError("multitask: a training forward without its tasks' batches")
        total: torch.Tensor | None = None
        self.metrics = {}
        for task, task_batch in self._chosen.items():
            head: Any = self.heads[task]
            loss = head(**task_batch).loss
            if self.sampling == "all":  # every task every step: a per-task train loss
                self.metrics[f"{self.name}_loss/{task}"] = loss.detach()
            weighted = self.task_weights[task] * loss
            total = weighted if total is None else total + weighted
        self._chosen = {}
        assert total is not None
        return total

    # -- export ------------------------------------------------------------------------
    def export(self, state_dict: dict[str, Any], export_dir: Path, tokenizer: Any) -> None:
        """``export_dir/tasks/<task>``: each head with the backbone as a plain model."""
        assert self.heads is not None
        for task in self.heads:
            head: Any = self.heads[task]
            prefix = f"terms.{self.name}.{task}."
            state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            where = export_dir / EXPORT_DIR / task
            head.save_pretrained(where, state_dict=state)
            tokenizer.save_pretrained(where)
            (where / "labels.json").write_text(json.dumps(self.labels[task]))
