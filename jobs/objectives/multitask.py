"""Multi-task learning: more tasks on the run's backbone, each with its own head, data and
loss weight, beside the run's own task.

    graft finetune 'objectives=[{name: multitask, args: {tasks: {topic: {path: topic.jsonl,
        weight: 0.5}, tone: {path: tone.jsonl}}, sampling: temperature, temperature: 2}}]'
    # several tasks in one file, told apart by its "task" field; an LM task beside them
    graft finetune model=smollm2 'objectives=[{name: multitask, args: {path: mixed.jsonl,
        tasks: {topic: {}, tone: {weight: 2}, chat: {head: lm, path: sft.jsonl}}}}]'

The run's own task (data.path, its head or LM head) trains every step. Each extra task is
a model of the family (its sequence classification model, e.g.
BertForSequenceClassification, or for ``head: lm`` its causal LM, e.g. LlamaForCausalLM)
whose backbone *is* the run's backbone: the same module, so its weights are shared, a
strategy's frozen blocks or LoRA adapters are the same for every task, and ZeRO-3
partitions them once. loss = task loss + weight x sum over the micro step's extra tasks
of w_t x loss_t.

args (checked before Ray starts, jobs/preflight.py):
- ``tasks``: name -> ``{path, weight, head, format}``:
  ``path``: its data file (JSONL/CSV; .txt for an LM's plain text), read like data.path
  with the run's field names (data.text_field, data.label_field, data.prompt_field,
  data.response_field); or left out to take the task's rows from ``args.path``.
  ``weight``: w_t (default 1). ``head``: ``classification`` (default; its own label set
  from its file) or ``lm`` (next-token prediction, decoder families only; its LM head
  starts from the run's: the tied input embeddings, else a copy of the run's LM head).
  ``format`` (lm): ``instruction`` (prompt/response, the loss on responses; default) or
  ``text`` (packed plain text; the default for .txt). Names: letters, digits, _ and -.
- ``path`` / ``task_field``: one file holding several tasks' rows, each naming its task
  in ``task_field`` (default ``task``); rows of tasks not listed are skipped.
- ``sampling``: which extra tasks a micro step trains: ``all`` (every one), or one drawn
  with probability proportional to n_t (``proportional``, the default), 1 (``uniform``)
  or n_t^(1/T) (``temperature``, ``temperature`` T > 0, default 2), n_t being the
  task's number of training examples. The draw is seeded by the micro step: every
  worker (and a resumed run) draws the same task.
- ``eval_fraction``: the share of each task's rows held out for its evaluation (0.2).

Each task's micro batches are their own stream (sharded like the training data, keyed
by the micro step). At every evaluation each task's held-out part is scored with its
head: ``eval_loss/<task>``, ``eval_accuracy/<task>`` (token accuracy for an LM task),
``eval_macro_f1/<task>`` or ``eval_perplexity/<task>``, and ``eval_accuracy/mean`` over
the run's task and the extra ones. The export writes ``export/tasks/<task>/``: a plain
transformers model per task (the trained backbone, LoRA merged in, and the task's head),
with the tokenizer and, for classification, labels.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conf.schema import ConfigError, DataConfig, TermConfig
from jobs.objectives.args import check_keys, is_number

ARGS = {"tasks", "path", "task_field", "sampling", "temperature", "eval_fraction"}
TASK_ARGS = {"path", "weight", "head", "format"}
# head -> the jobs.tasks task that encodes, batches and scores its data
HEADS = {"classification": "sequence_classification", "lm": "causal_lm"}
LM_FORMATS = ("instruction", "text")
SAMPLING = ("proportional", "uniform", "temperature", "all")
NAME = re.compile(r"[A-Za-z0-9_-]+")
# A batch routed to a task's head (evaluation): batch[ROUTE] = (term name, task name).
ROUTE = "route"
EXPORT_DIR = "tasks"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One extra task as configured."""

    name: str
    path: str  # its own file, or the shared one (``shared``)
    weight: float
    head: str  # a key of HEADS
    format: str  # the data.task its rows are read as: classification, instruction, text
    shared: bool  # rows picked from args.path by the task field

    @property
    def kind(self) -> Any:
        from jobs import tasks

        return tasks.TASKS[HEADS[self.head]]

    def data(self, data: DataConfig) -> DataConfig:
        """The run's data config as this task reads its file: its format, its own labels."""
        return dataclasses.replace(
            data, task=self.format, path=self.path, labels=None, num_classes=None
        )


def specs(args: dict[str, Any]) -> dict[str, TaskSpec]:
    shared = args.get("path")
    out = {}
    for name, task in (args.get("tasks") or {}).items():
        task = dict(task or {})
        head = str(task.get("head", "classification"))
        path = str(Path(str(task.get("path") or shared)).expanduser())
        default = "text" if path.lower().endswith(".txt") else "instruction"
        out[str(name)] = TaskSpec(
            name=str(name),
            path=path,
            weight=float(task.get("weight", 1.0)),
            head=head,
            format=str(task.get("format", default)) if head == "lm" else "classification",
            shared=not task.get("path"),
        )
    return out


def check_args(index: int, args: dict[str, Any]) -> None:
    needed = (
        "multitask needs tasks: {name: {path: <data file>, weight: <w>, head: "
        "classification|lm}} (path may be left out with args.path, one file for all tasks)"
    )
    key = check_keys("multitask", index, args, ARGS, {"tasks": needed})
    tasks = args["tasks"]
    if not isinstance(tasks, dict):
        raise ConfigError(f"{key}.tasks", needed)
    for name, task in tasks.items():
        where = f"{key}.tasks.{name}"
        if not NAME.fullmatch(str(name)):
            raise ConfigError(where, "a task name is letters, digits, _ and - only")
        if task is not None and not isinstance(task, dict):
            raise ConfigError(where, f"a task is a mapping of {sorted(TASK_ARGS)}, got {task!r}")
        task = task or {}
        unknown = sorted(set(task) - TASK_ARGS)
        if unknown:
            raise ConfigError(where, f"a task takes {sorted(TASK_ARGS)}, got unknown {unknown}")
        if not task.get("path") and not args.get("path"):
            raise ConfigError(
                f"{where}.path",
                "each task needs its data file, or args.path (one file whose "
                "task field names each row's task)",
            )
        weight = task.get("weight", 1.0)
        if not is_number(weight) or weight < 0:
            raise ConfigError(f"{where}.weight", f"must be a number >= 0, got {weight!r}")
        head = task.get("head", "classification")
        if head not in HEADS:
            raise ConfigError(f"{where}.head", f"{head!r} is not one of {sorted(HEADS)}")
        if "format" in task and (head != "lm" or task["format"] not in LM_FORMATS):
            raise ConfigError(
                f"{where}.format",
                f"format is for head: lm, one of {list(LM_FORMATS)}; got {task['format']!r} "
                f"with head: {head}",
            )
    if not NAME.fullmatch(str(args.get("task_field", "task"))):
        raise ConfigError(f"{key}.task_field", f"must be a field name, got {args['task_field']!r}")
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
    spec: TaskSpec, data: DataConfig, *, key: str, eval_fraction: float, task_field: str = "task"
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str] | None]:
    """A task's (train, eval) records and its sorted label list (None for an LM task),
    split with data.split_seed."""
    from jobs import data as data_lib
    from jobs.data import files

    tdata = spec.data(data)
    select = (task_field, spec.name) if spec.shared else None
    rows = files.read(spec.path, tdata, spec.kind.fields(tdata), key=key, select=select)
    records = data_lib.normalise(rows, tdata)
    labels = None
    if spec.head == "classification":
        labels = sorted({r["label"] for r in records})
        if len(labels) < 2:
            raise ConfigError(key, f"a classification task needs at least 2 labels, found {labels}")
    order = list(range(len(records)))
    random.Random(data.split_seed).shuffle(order)
    cut = max(1, round(len(order) * eval_fraction))
    if len(order) - cut < 1:
        raise ConfigError(key, f"{len(records)} examples leave none for training")
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]], labels


def _bare(model: nn.Module) -> Any:
    """The transformers model (inside peft's wrapper, adapters injected, for LoRA)."""
    import peft

    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def task_head(model: nn.Module, spec: TaskSpec, labels: list[str] | None, seed: int) -> nn.Module:
    """The family's model for the task's head, its backbone replaced by ``model``'s (the
    same module: shared weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = _bare(model)
    config = copy.deepcopy(base.config)
    if spec.head == "classification":
        assert labels is not None
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.problem_type = "single_label_classification"
        auto: Any = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same head on every rank
        head = auto.from_config(config)
    prefix = str(base.base_model_prefix)
    if not hasattr(head, prefix) or not hasattr(base, prefix):
        raise ConfigError(
            "objectives.multitask",
            f"{type(base).__name__} and {type(head).__name__} do not share a backbone",
        )
    setattr(head, prefix, getattr(base, prefix))
    if spec.head == "lm":  # the LM head the run's model has, or its tied embeddings
        out = head.get_output_embeddings()
        if getattr(config, "tie_word_embeddings", False):
            out.weight = base.get_input_embeddings().weight
        elif (theirs := base.get_output_embeddings()) is not None:
            if theirs.weight.shape == out.weight.shape:
                out.weight.data.copy_(theirs.weight.data)
    return head.to(next(model.parameters()).dtype)


class MultiTask:
    trains_module = True  # (jobs.plan counts its module as trainable parameters)

    def __init__(self, cfg: TermConfig) -> None:
        args = dict(cfg.args)
        self.name = cfg.name
        self.weight = cfg.weight
        self.specs = specs(args)
        self.task_weights = {name: spec.weight for name, spec in self.specs.items()}
        self.task_field = str(args.get("task_field", "task"))
        self.sampling = str(args.get("sampling", "proportional"))
        self.temperature = float(args.get("temperature", 2.0))
        self.eval_fraction = float(args.get("eval_fraction", 0.2))
        self.labels: dict[str, list[str] | None] = {}
        self.sizes: dict[str, int] = {}
        self.heads: nn.ModuleDict | None = None
        self._held_out: dict[str, list[dict[str, Any]]] = {}
        self._chosen: dict[str, dict[str, torch.Tensor]] = {}
        self.metrics: dict[str, torch.Tensor] = {}

    # -- data: a stream per task, and each task's evaluation ---------------------------
    def read(self, task: str, data: Any, key: str | None = None) -> tuple[list, list, Any]:
        """The task's (train, eval) records and labels."""
        spec = self.specs[task]
        key = key or f"objectives.multitask.args.tasks.{task}.path"
        return read_task(
            spec, data, key=key, eval_fraction=self.eval_fraction, task_field=self.task_field
        )

    def task_kind(self, task: str) -> Any:
        """The jobs.tasks task that scores this task's head."""
        return self.specs[task].kind

    def task_streams(self, data: Any, tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
        """Each task's encoded training examples (the worker streams them); the held-out
        parts are kept for ``task_evals``."""
        streams, self._held_out = {}, {}
        for task, spec in self.specs.items():
            train, held_out, labels = self.read(task, data)
            tdata = spec.data(data)
            streams[task] = spec.kind.encode(train, tokenizer, tdata, labels)
            self._held_out[task] = spec.kind.encode(held_out, tokenizer, tdata, labels)
            self.labels[task], self.sizes[task] = labels, len(streams[task])
        return streams

    def task_evals(self, data: Any, tokenizer: Any) -> dict[str, list[dict[str, Any]]]:
        """Each task's encoded held-out examples (after ``task_streams``)."""
        if not self._held_out:
            self.task_streams(data, tokenizer)
        return dict(self._held_out)

    def probabilities(self) -> dict[str, float]:
        """Each task's chance of being drawn for a micro step (``sampling``)."""
        power = {"proportional": 1.0, "uniform": 0.0}.get(self.sampling, 1.0 / self.temperature)
        mass = {t: float(self.sizes.get(t, 1)) ** power for t in self.specs}
        total = sum(mass.values())
        return {t: m / total for t, m in mass.items()}

    def draw(self, progress: float) -> list[str]:
        """The micro step's tasks: all, or one drawn with a seed from the micro step."""
        if self.sampling == "all":
            return list(self.specs)
        rng = random.Random(round(progress * 2**40))
        tasks, weights = zip(*self.probabilities().items(), strict=True)
        return rng.choices(list(tasks), weights=list(weights))

    # -- the term --------------------------------------------------------------------
    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        if context.data is not None and context.tokenizer is not None and not self.labels:
            for task in self.specs:
                _, _, self.labels[task] = self.read(task, context.data)
        heads = nn.ModuleDict()
        for i, (task, spec) in enumerate(self.specs.items()):
            labels = self.labels.get(task)
            if spec.head == "classification" and not labels:
                labels = ["a", "b"]  # (jobs.memprobe: any 2 labels)
            heads[task] = task_head(model, spec, labels, seed=1000 + i)
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
            loss = self.specs[task].kind.loss(head(**task_batch), task_batch)
            if self.sampling == "all":  # every task every step: a per-task train loss
                self.metrics[f"{self.name}_loss/{task}"] = loss.detach()
            weighted = self.task_weights[task] * loss
            total = weighted if total is None else total + weighted
        self._chosen = {}
        assert total is not None
        return total

    # -- export ------------------------------------------------------------------------
    def export(
        self,
        state_dict: dict[str, Any],
        model_state: dict[str, Any],
        export_dir: Path,
        tokenizer: Any,
    ) -> None:
        """``export_dir/tasks/<task>``: a plain transformers model per task, built from its
        config: the trained backbone from ``model_state`` (the run's bare model, LoRA
        merged, plain names) and the task's own head from ``state_dict`` (the
        ``Objective``'s)."""
        assert self.heads is not None
        for task in self.heads:
            head: Any = self.heads[task]
            backbone = str(head.base_model_prefix) + "."
            prefix = f"terms.{self.name}.{task}."
            own = {
                k[len(prefix) :]: v
                for k, v in state_dict.items()
                if k.startswith(prefix) and not k[len(prefix) :].startswith(backbone)
            }
            state = {**{k: v for k, v in model_state.items() if k.startswith(backbone)}, **own}
            plain = type(head)(copy.deepcopy(head.config))
            plain.load_state_dict(state)  # strict: every weight of the task's model
            where = export_dir / EXPORT_DIR / task
            plain.save_pretrained(where)
            tokenizer.save_pretrained(where)
            if self.labels.get(task) is not None:
                (where / "labels.json").write_text(json.dumps(self.labels[task]))
