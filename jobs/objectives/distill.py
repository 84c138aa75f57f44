"""Knowledge distillation (Hinton et al., 2015): a teacher's softened predictions as an
extra target for the student being fine-tuned.

    graft finetune 'objectives=[{name: distill, args: {teacher: runs/big-teacher, alpha: 0.5}}]'

loss = alpha * task loss + (1 - alpha) * T^2 * KL(p_teacher,T || p_student,T)

where p_.,T = softmax(logits / T), the KL is averaged over the predictions the task loss
scores (each example for classification; each response / target token for a causal LM,
over the whole vocabulary), and T^2 keeps the soft term's gradients on the scale of the
task loss's as T grows. The term's ``weight`` (default 1) multiplies the soft term.

args (checked before Ray starts, jobs/preflight.py):
- ``teacher``: a graft run directory (its ``export/``: the full model, the merged LoRA
  model, or base + adapter) or a Hugging Face model directory; it must use the student's
  tokenizer (the same input ids go into both) and, for classification, its label set (in
  any order: the teacher's logits are put in the student's order).
- ``alpha``: the task loss's share, in [0, 1] (default 0.5).
- ``temperature``: T > 0 (default 2.0).

The teacher runs forward only, in eval mode (dropout off whatever the engine's mode),
without gradients; its weights are frozen parameters of a module ``attach`` returns, so
DeepSpeed wraps them with the student (ZeRO-3 partitions them too) and no optimizer
state is kept for them. The export leaves the teacher out. Logged: ``distill`` (the
T^2-scaled KL) and ``distill_kl`` (the KL itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conf.schema import ConfigError, TermConfig
from jobs.objectives.args import check_keys, is_number
from jobs.tasks.common import model_inputs

ARGS = {"teacher", "alpha", "temperature"}


def check_args(index: int, args: dict[str, Any]) -> None:
    """The args' own values (the teacher's files are read by preflight)."""
    needed = "distill needs a teacher: a graft run directory or a Hugging Face model directory"
    key = check_keys("distill", index, args, ARGS, {"teacher": needed})
    alpha = args.get("alpha", 0.5)
    if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{key}.alpha", f"must be a number in [0, 1], got {alpha!r}")
    temperature = args.get("temperature", 2.0)
    if not is_number(temperature) or temperature <= 0:
        raise ConfigError(f"{key}.temperature", f"must be a number > 0, got {temperature!r}")


def teacher_dir(path: str, *, key: str) -> Path:
    """The directory ``from_pretrained`` reads the teacher from (or its LoRA adapter's)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(key, f"{path} is not a directory (a graft run or a model directory)")
    if (root / "export").is_dir():  # a graft run
        root = root / "export"
    elif (root / "config.yaml").is_file() and not (root / "config.json").is_file():
        raise ConfigError(key, f"{path} is a graft run without an export (run.export=false?)")
    for candidate in (root, root / "merged", root / "adapter"):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(
        key, f"{path} holds no model: expected config.json (or a graft run's export/)"
    )


def load_teacher(path: str, task: Any, *, key: str) -> tuple[nn.Module, Any]:
    """The teacher model (LoRA adapters merged in) and its tokenizer."""
    import peft
    from transformers import AutoConfig, AutoTokenizer

    where = teacher_dir(path, key=key)
    if (where / "adapter_config.json").is_file():
        base_path = json.loads((where / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        config = AutoConfig.from_pretrained(base_path)
        labels = labels_of(config)
        base = task.auto_class(config, labels).from_pretrained(base_path, config=config)
        model = peft.PeftModel.from_pretrained(base, where).merge_and_unload()
    else:
        config = AutoConfig.from_pretrained(where)
        model = task.auto_class(config, labels_of(config)).from_pretrained(where, config=config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError):
        raise ConfigError(
            key, f"{where} has no tokenizer files: the teacher must come with its tokenizer"
        ) from None
    return model.float().eval(), tokenizer


def labels_of(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label)] if id2label else None


def check_teacher(
    model: nn.Module, tokenizer: Any, student_tokenizer: Any, labels: list[str] | None, *, key: str
) -> list[int] | None:
    """ConfigError unless the teacher reads the student's input ids and predicts its
    labels; returns the teacher's index of each student label (None without labels)."""
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(
            key,
            f"the teacher's tokenizer ({len(tokenizer)} tokens) is not the student's "
            f"({len(student_tokenizer)} tokens): both read the same input ids, so they "
            "must share one tokenizer",
        )
    if labels is None:
        return None
    theirs = labels_of(model.config) or []
    if sorted(theirs) != sorted(labels):
        raise ConfigError(
            key,
            f"the teacher predicts labels {theirs}, the student's data has {labels}: "
            "distillation needs the same label set",
        )
    return [theirs.index(label) for label in labels]


class Teacher(nn.Module):
    """The frozen teacher; stays in eval mode when the engine switches to training."""

    def __init__(self, model: nn.Module, order: list[int] | None) -> None:
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.order = order
        self.model.eval()

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.model.eval()
        return self

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(**model_inputs(batch))
        logits = out.logits.float()
        return logits[..., self.order] if self.order is not None else logits


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


class Distill:
    def __init__(self, cfg: TermConfig) -> None:
        args = dict(cfg.args)
        self.name = cfg.name
        self.teacher_path = str(args.get("teacher", ""))
        self.alpha = float(args.get("alpha", 0.5))
        self.temperature = float(args.get("temperature", 2.0))
        # Objective scales the task loss by task_scale; the soft term carries (1 - alpha).
        self.task_scale = self.alpha
        self.weight = cfg.weight * (1.0 - self.alpha)
        self.teacher: Teacher | None = None
        self.task: Any = None
        self.metrics: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        key = "objectives.distill.args.teacher"
        teacher, tokenizer = load_teacher(self.teacher_path, context.task, key=key)
        order = None
        if context.tokenizer is not None:  # (preflight checked this; a worker re-checks)
            order = check_teacher(teacher, tokenizer, context.tokenizer, context.labels, key=key)
        self.task = context.task
        self.teacher = Teacher(teacher, order)
        return self.teacher

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def value(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.teacher is not None
        teacher = self.teacher.logits(batch)
        rows = self.task.scored_logits(outputs.logits, batch)
        kl = soft_kl(rows, self.task.scored_logits(teacher, batch), self.temperature)
        self.metrics = {"distill_kl": kl.detach()}
        return kl * self.temperature**2
