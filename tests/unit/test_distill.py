"""Knowledge distillation without Ray: the term against a hand-computed KL on one batch
(classification and causal LM, response tokens only), the teacher frozen and in eval
mode, teachers from a graft run's export, and bad input named by key before Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conf.schema import ConfigError, TermConfig
from jobs import objectives, tasks
from jobs.config import compose
from jobs.models import Layout, build, byte_tokenizer
from jobs.objectives import distill
from jobs.preflight import preflight
from jobs.tasks.common import IGNORE_INDEX
from tests.conftest import tiny_overrides, write_teacher

LABELS = ["neg", "pos"]


def _objective(data_dir: Path, teacher: Path, *, task: str, **args: Any) -> Any:
    cfg = compose(tiny_overrides(data_dir, task=task))
    labels = LABELS if task == "classification" else None
    model, tokenizer = build(cfg.model, labels=labels)
    context = objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: {},
        tokenizer=tokenizer,
        labels=labels,
    )
    term = TermConfig(name="distill", args={"teacher": str(teacher), **args})
    wrapped = objectives.Objective(model, context.task, objectives.build([term]), context)
    return wrapped, model, tokenizer, context.task


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax(teacher / t, -1)
    return (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean()


def test_classification_matches_a_hand_computed_kl_and_the_teacher_stays_frozen(
    data_dir: Path, tmp_path: Path
) -> None:
    teacher_dir = write_teacher(tmp_path / "teacher", data_dir, labels=LABELS)
    wrapped, student, tokenizer, task = _objective(
        data_dir, teacher_dir, task="classification", alpha=0.3, temperature=2.5
    )
    records = [
        {"text": "the film was great", "label": "pos"},
        {"text": "the film was awful and grim", "label": "neg"},
        {"text": "lovely", "label": "pos"},
    ]
    batch = task.collate(task.encode(records, tokenizer, compose([]).data, LABELS), 0)
    wrapped.train()
    teacher = wrapped.terms["distill"].model
    assert not teacher.training  # eval mode although the objective trains
    out = wrapped(**batch)

    from transformers import AutoModelForSequenceClassification

    plain_teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        t_logits = plain_teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        s_logits = student(**batch).logits
    kl = _hand_kl(s_logits, t_logits, 2.5)
    assert out.terms["distill_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.terms["distill"].item() == pytest.approx(2.5**2 * kl.item(), rel=1e-5)
    ce = F.cross_entropy(s_logits, batch["labels"])
    assert out.loss.item() == pytest.approx(0.3 * ce.item() + 0.7 * 6.25 * kl.item(), rel=1e-5)

    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # forward only
    assert any(p.grad is not None for p in student.parameters())
    assert not [p for p in wrapped.terms.parameters() if p.requires_grad]  # no optimizer state


def test_causal_lm_kl_is_over_response_tokens_and_the_whole_vocabulary(
    data_dir: Path, tmp_path: Path
) -> None:
    teacher_dir = write_teacher(tmp_path / "teacher", data_dir, task="instruction")
    wrapped, student, tokenizer, task = _objective(
        data_dir, teacher_dir, task="instruction", alpha=0.0, temperature=1.0
    )
    data = compose(tiny_overrides(data_dir)).data
    records = [{"prompt": "color of lime?", "response": "green"}, {"prompt": "a?", "response": "b"}]
    batch = task.collate(task.encode(records, tokenizer, data, None), 0)
    wrapped.train()
    out = wrapped(**batch)

    from transformers import AutoModelForCausalLM

    plain_teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        t_logits = plain_teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        s_logits = student(**batch).logits
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert 0 < mask.sum() < mask.numel()  # prompts and padding are left out
    kl = _hand_kl(s_logits[:, :-1][mask], t_logits[:, :-1][mask], 1.0)
    assert out.terms["distill"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(kl.item(), rel=1e-5)  # alpha 0: the soft term only


def test_a_teacher_from_a_graft_run_with_its_labels_in_another_order(
    data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    write_teacher(run / "export", data_dir, labels=["pos", "neg"])
    (run / "config.yaml").write_text("{}")
    (run / "export" / "labels.json").write_text(json.dumps(["pos", "neg"]))
    assert distill.teacher_dir(str(run), key="k") == run / "export"
    wrapped, _, _, _ = _objective(data_dir, run, task="classification")
    teacher = wrapped.terms["distill"]
    assert teacher.order == [1, 0]  # the student's neg is the teacher's column 1
    batch = {"input_ids": torch.tensor([[1, 40, 41, 2]]), "attention_mask": torch.ones(1, 4)}
    with torch.no_grad():
        raw = teacher.model(**batch).logits
    assert torch.equal(teacher.logits(batch), raw[:, [1, 0]])


def test_bad_input_is_named_before_ray(data_dir: Path, tmp_path: Path) -> None:
    base = tiny_overrides(data_dir, task="classification")
    good = write_teacher(tmp_path / "good", data_dir, labels=LABELS)

    def refused(args: str) -> str:
        with pytest.raises(ConfigError) as e:
            preflight(compose([*base, f"objectives=[{{name:distill,args:{{{args}}}}}]"]))
        return str(e.value)

    assert "objectives[0].args.teacher" in refused("alpha:0.5")
    assert "objectives[0].args.alpha" in refused(f"teacher:{good},alpha:1.5")
    assert "objectives[0].args.alpha" in refused(f"teacher:{good},alpha:-0.1")
    assert "objectives[0].args.temperature" in refused(f"teacher:{good},temperature:0")
    assert "unknown ['tau']" in refused(f"teacher:{good},tau:2")
    assert "is not a directory" in refused(f"teacher:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert "holds no model" in refused(f"teacher:{tmp_path / 'empty'}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert "without an export" in refused(f"teacher:{tmp_path / 'run'}")

    other_labels = write_teacher(tmp_path / "labels", data_dir, labels=["a", "b", "c"])
    message = refused(f"teacher:{other_labels}")
    assert "objectives[0].args.teacher" in message and "same label set" in message

    other_tokens = write_teacher(tmp_path / "tokens", data_dir, labels=LABELS)
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other_tokens)
    message = refused(f"teacher:{other_tokens}")
    assert "objectives[0].args.teacher" in message and "share one tokenizer" in message

    # and a good teacher passes
    preflight(compose([*base, f"objectives=[{{name:distill,args:{{teacher:{good}}}}}]"]))
