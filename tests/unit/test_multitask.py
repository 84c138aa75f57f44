"""Multi-task heads without Ray: a head per task on the shared backbone, the loss
against a hand-computed one, the sampling rules, evaluation routed to a task's head,
the per-task export as a plain transformers model, and bad input named by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from conf.schema import ConfigError, TermConfig
from jobs import objectives, tasks
from jobs.config import compose
from jobs.models import Layout, build
from jobs.objectives import multitask
from jobs.preflight import preflight
from tests.conftest import tiny_overrides

LABELS = ["neg", "pos"]


def _wrapped(data_dir: Path, **args: Any) -> Any:
    cfg = compose(tiny_overrides(data_dir, task="classification"))
    model, tokenizer = build(cfg.model, labels=LABELS)
    context = objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: {},
        tokenizer=tokenizer,
        labels=LABELS,
        data=cfg.data,
    )
    term_cfg = TermConfig(
        name="multitask",
        args={"tasks": {"color": {"path": str(data_dir / "colors.jsonl"), "weight": 0.5}}, **args},
    )
    term = objectives.build([term_cfg])[0]
    streams = term.task_streams(cfg.data, tokenizer)
    wrapped = objectives.Objective(model, context.task, [term], context)
    return wrapped, model, tokenizer, term, streams, cfg


def test_each_task_has_a_head_on_the_shared_backbone_and_the_loss_adds_up(
    data_dir: Path,
) -> None:
    wrapped, model, tokenizer, term, streams, cfg = _wrapped(data_dir)
    head = wrapped.terms["multitask"]["color"]
    assert head.bert is model.bert  # the same module: shared weights
    assert term.labels["color"] == sorted({"red", "yellow", "green", "purple", "orange", "pink"})
    assert head.config.num_labels == 6 and model.config.num_labels == 2
    main = tasks.get(cfg.model).collate(
        tasks.get(cfg.model).encode(
            [{"text": "the film was great", "label": "pos"}, {"text": "grim", "label": "neg"}],
            tokenizer,
            cfg.data,
            LABELS,
        ),
        tokenizer.pad_token_id,
    )
    color = term.collate(streams["color"][:3], tokenizer.pad_token_id)
    wrapped.train()
    out = wrapped(**main, **{"multitask/color": {**color, "progress": torch.tensor(0.0)}})
    with torch.no_grad():
        main_loss = model(**main).loss
        logits = head(input_ids=color["input_ids"], attention_mask=color["attention_mask"]).logits
        color_loss = F.cross_entropy(logits, color["labels"])
    assert float(out.terms["multitask"]) == pytest.approx(0.5 * float(color_loss), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(main_loss + 0.5 * color_loss), rel=1e-5)
    out.loss.backward()  # the extra task's gradient reaches the shared backbone and its head
    assert head.classifier.weight.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    # The parameters are counted once: the head adds only its classifier.
    unique = {id(p) for p in wrapped.parameters()}
    assert len(unique) == len({id(p) for p in model.parameters()}) + 2

    # An evaluation batch routed to the head: its own logits.
    wrapped.eval()
    with torch.no_grad():
        routed = wrapped(
            input_ids=color["input_ids"],
            attention_mask=color["attention_mask"],
            **{multitask.ROUTE: ("multitask", "color")},
        )
    assert torch.allclose(routed.logits, logits, atol=1e-6)


def test_the_export_is_a_plain_model_per_task(data_dir: Path, tmp_path: Path) -> None:
    wrapped, _, tokenizer, term, streams, _ = _wrapped(data_dir)
    term.export(wrapped.state_dict(), tmp_path, tokenizer)
    where = tmp_path / "tasks" / "color"
    plain = AutoModelForSequenceClassification.from_pretrained(where).eval()
    assert json.loads((where / "labels.json").read_text()) == term.labels["color"]
    assert plain.config.id2label[0] == term.labels["color"][0]
    color = term.collate(streams["color"][:4], tokenizer.pad_token_id)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped.terms["multitask"]["color"](
            input_ids=color["input_ids"], attention_mask=color["attention_mask"]
        ).logits
        got = plain(input_ids=color["input_ids"], attention_mask=color["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_sampling_rules(data_dir: Path) -> None:
    term = multitask.MultiTask(
        TermConfig(name="multitask", args={"tasks": {"a": {"path": "x"}, "b": {"path": "y"}}})
    )
    term.sizes = {"a": 300, "b": 100}
    assert term.probabilities() == pytest.approx({"a": 0.75, "b": 0.25})  # proportional
    term.sampling = "uniform"
    assert term.probabilities() == pytest.approx({"a": 0.5, "b": 0.5})
    term.sampling, term.temperature = "temperature", 2.0
    assert term.probabilities()["a"] == pytest.approx(300**0.5 / (300**0.5 + 100**0.5))
    # The draw depends on the micro step only: every rank and a resume draw the same.
    draws = [term.draw(i / 1000) for i in range(1000)]
    assert draws == [term.draw(i / 1000) for i in range(1000)]
    assert all(len(d) == 1 for d in draws)
    share = sum(d == ["a"] for d in draws) / len(draws)
    assert share == pytest.approx(term.probabilities()["a"], abs=0.05)
    term.sampling = "all"
    assert term.draw(0.3) == ["a", "b"]


def test_bad_input_is_named_before_ray(data_dir: Path, tmp_path: Path) -> None:
    cls = tiny_overrides(data_dir, task="classification")
    colors = data_dir / "colors.jsonl"

    def refused(args: str, *extra: str) -> ConfigError:
        with pytest.raises(ConfigError) as e:
            preflight(compose([*cls, *extra, f"objectives=[{{name:multitask,args:{{{args}}}}}]"]))
        return e.value

    assert refused("sampling:all").key == "objectives[0].args.tasks"
    assert refused("tasks:{c:{weight:1}}").key == "objectives[0].args.tasks.c.path"
    assert (
        refused(f"tasks:{{c:{{path:{colors},weight:-1}}}}").key
        == "objectives[0].args.tasks.c.weight"
    )
    assert "unknown ['w']" in str(refused(f"tasks:{{c:{{path:{colors},w:1}}}}"))
    assert (
        refused(f"tasks:{{c:{{path:{colors}}}}},sampling:random").key
        == "objectives[0].args.sampling"
    )
    assert (
        refused(f"tasks:{{c:{{path:{colors}}}}},sampling:temperature,temperature:0").key
        == "objectives[0].args.temperature"
    )
    assert (
        refused(f"tasks:{{c:{{path:{tmp_path / 'no.jsonl'}}}}}").key
        == "objectives[0].args.tasks.c.path"
    )
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    assert "at least 2 labels" in str(refused(f"tasks:{{c:{{path:{one}}}}}"))
    small = tmp_path / "small.jsonl"
    small.write_text(
        "".join(json.dumps({"text": str(i), "label": "xy"[i % 2]}) + "\n" for i in range(10))
    )
    assert "do not fill one micro batch" in str(refused(f"tasks:{{c:{{path:{small}}}}}"))
    lora = refused(f"tasks:{{c:{{path:{colors}}}}}", "strategy=lora")
    assert lora.key == "objectives[0].name" and "allowed: full, freeze_depth" in str(lora)
    preflight(
        compose([*cls, f"objectives=[{{name:multitask,args:{{tasks:{{c:{{path:{colors}}}}}}}}}]"])
    )


def test_a_tasks_weight_and_metric_are_sweep_knobs(data_dir: Path) -> None:
    from conf.schema import ParamSpec
    from jobs import space as space_lib
    from jobs.sweep import check

    colors = data_dir / "colors.jsonl"
    term = f"objectives=[{{name:multitask,args:{{tasks:{{color:{{path:{colors},weight:0.5}}}}}}}}]"
    cfg = compose(
        tiny_overrides(data_dir, task="classification")
        + [term, "sweep.objectives=[{metric:eval_accuracy/mean,mode:max}]"],
        "sweep",
    )
    assert cfg.sweep is not None
    cfg.sweep.space["color_weight"] = ParamSpec(
        key="objectives.multitask.args.tasks.color.weight", type="float", low=0.1, high=1.0
    )
    space, _ = check(cfg)
    params = {"strategy": "full", "lr": 1e-3, "lr_ratio": 1.0, "color_weight": 0.8}
    trial = space_lib.apply(space_lib.trial_base(cfg), space, params)
    assert trial.objectives[0].args["tasks"]["color"]["weight"] == 0.8
