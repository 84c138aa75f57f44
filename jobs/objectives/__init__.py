"""Loss terms added to the task loss: ``loss = task loss + sum_i weight_i * term_i``.

    graft finetune 'objectives=[{name: l2sp, weight: 0.01}]'
    python -c "from jobs import objectives; print(sorted(objectives.TERMS))"

A term is one file here and one line in ``TERMS``. It may

- ``attach`` modules or hooks to the model before DeepSpeed starts, so that ZeRO
  partitions what it adds along with the model (a reference copy, a domain classifier,
  a second task's head); modules it returns are trained and checkpointed with the model
  and left out of the export (``trains_module = True`` on a term whose module trains:
  ``graft plan`` counts it with the trainable parameters);
- ``prepare`` a batch (add a second data stream's batch, a teacher's logits);
- scale the task loss by its ``task_scale`` (distillation's alpha; 1 when absent);
- give its ``value`` for a batch, after the model's forward, logged by name, and more
  values to log in ``metrics`` (by full name, e.g. ``dann_domain_accuracy``);
- have its own data stream: ``stream_records(data)``, ``encode`` and ``collate``; the
  worker then puts one micro batch of it under the term's name in every training batch
  (sharded like the training data, keyed by the micro step so a resume sees the same
  ones), with the run's ``progress`` (0 to 1) beside it.

``Objective`` is the module DeepSpeed wraps: the model plus the terms' modules. Its
forward returns the model's outputs with ``loss`` replaced by the total and ``terms``
holding each term's value; with no terms it is the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from conf.schema import ConfigError, TermConfig
from jobs.objectives import dann, distill, ewc, l2sp, multitask


@dataclass
class Context:
    """What a term may need when it attaches."""

    layout: Any  # where blocks, embeddings and heads are (jobs.models.Layout)
    task: Any  # jobs.tasks.Task
    zero_stage: int
    # The bare model's weights as built at step 0 (pretrained, or the seeded scratch
    # init), by name; called only by terms that need them.
    pretrained: Callable[[], dict[str, torch.Tensor]]
    # The run's tokenizer, label list, data config, micro batch size and directory
    # (None where unknown: jobs.memprobe).
    tokenizer: Any = None
    labels: list[str] | None = None
    data: Any = None
    micro_batch_size: int = 1
    run_dir: Any = None


class Term(Protocol):
    name: str
    weight: float

    def attach(self, model: nn.Module, context: Context) -> nn.Module | None:
        """Before DeepSpeed: add hooks or return a module to train with the model."""

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def value(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


TERMS: dict[str, Callable[[TermConfig], Term]] = {
    "l2sp": l2sp.L2SP,
    "dann": dann.DANN,
    "distill": distill.Distill,
    "ewc": ewc.EWC,
    "multitask": multitask.MultiTask,
}

# Where Objective keeps the wrapped model and the terms' modules (export strips these).
MODEL = "model"
TERM_MODULES = "terms"


def build(configs: list[TermConfig]) -> list[Term]:
    terms = []
    for i, cfg in enumerate(configs):
        if cfg.name not in TERMS:
            raise ConfigError(
                f"objectives[{i}].name", f"{cfg.name!r} is not one of {sorted(TERMS)}"
            )
        terms.append(TERMS[cfg.name](cfg))
    return terms


class Objective(nn.Module):
    """The model and its loss terms as one module, the one DeepSpeed wraps."""

    def __init__(self, model: nn.Module, task: Any, terms: list[Term], context: Context) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.loss_terms = terms
        modules = {}
        for term in terms:
            module = term.attach(model, context)
            if module is not None:
                modules[term.name] = module
        self.terms = nn.ModuleDict(modules)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, **batch: Any) -> Any:
        route = batch.pop(multitask.ROUTE, None)
        if route is not None:  # a batch for a term's own head (a multi-task evaluation)
            term, head = route
            heads: Any = self.terms[term]
            return heads[head](**batch)
        if not self.loss_terms:
            return self.model(**batch)
        for term in self.loss_terms:
            batch = term.prepare(batch)
        outputs = self.model(**batch)
        if not self.training:
            return outputs
        # A term may scale the task loss (distillation's alpha); 1 otherwise.
        scale = 1.0
        for term in self.loss_terms:
            scale *= getattr(term, "task_scale", 1.0)
        total = scale * self.task.loss(outputs, batch)
        values = {}
        for term in self.loss_terms:
            value = term.value(outputs, batch)
            values[term.name] = value.detach()
            values.update(getattr(term, "metrics", {}))
            total = total + term.weight * value
        outputs.loss = total
        outputs.terms = values
        return outputs


def trained_term_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The terms' own trained parameters (a DANN classifier, the task heads), copied, by
    name under ``terms``: what a new phase's ``Objective`` must start from. Parameters a
    term shares with the model (a task head's backbone) travel with the model's weights;
    frozen ones (a teacher, L2-SP's reference) are rebuilt as they were."""
    if not isinstance(objective, Objective):
        return {}
    shared = {id(p) for p in objective.model.parameters()}
    return {
        name: p.detach().clone()
        for name, p in objective.terms.named_parameters()
        if p.requires_grad and id(p) not in shared
    }


def load_term_state(objective: Objective, state: dict[str, torch.Tensor]) -> None:
    """``trained_term_state``'s copy into a new (not yet partitioned) ``Objective``."""
    own = dict(objective.terms.named_parameters())
    missing = sorted(set(state) - set(own))
    if missing:
        raise RuntimeError(f"the loss terms lost parameters between phases: {missing}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside an ``Objective`` (the module itself otherwise)."""
    return module.model if isinstance(module, Objective) else module


def model_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An ``Objective``'s state dict as the bare model's: prefix off, terms dropped."""
    prefix = MODEL + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
