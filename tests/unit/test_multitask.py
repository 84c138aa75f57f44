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
    context = _context(cfg, model, tokenizer, LABELS)
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
    color = term.task_kind("color").collate(streams["color"][:3], tokenizer.pad_token_id)
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
    wrapped, model, tokenizer, term, streams, _ = _wrapped(data_dir)
    term.export(wrapped.state_dict(), model.state_dict(), tmp_path, tokenizer)
    where = tmp_path / "tasks" / "color"
    plain = AutoModelForSequenceClassification.from_pretrained(where).eval()
    assert json.loads((where / "labels.json").read_text()) == term.labels["color"]
    assert plain.config.id2label[0] == term.labels["color"][0]
    color = term.task_kind("color").collate(streams["color"][:4], tokenizer.pad_token_id)
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
    lm = refused(f"tasks:{{c:{{path:{colors},head:lm}}}}")  # BERT has no causal LM
    assert lm.key == "objectives[0].args.tasks.c.head" and "encoder" in str(lm)
    assert refused(f"tasks:{{c:{{path:{colors},head:seq2seq}}}}").key == (
        "objectives[0].args.tasks.c.head"
    )
    assert refused(f"tasks:{{c:{{path:{colors},format:text}}}}").key == (
        "objectives[0].args.tasks.c.format"
    )
    # one file for several tasks: every row names its task, each task has rows
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": "x", "task": "t"}\n{"text": "b", "label": "y"}\n')
    missing = refused(f"path:{mixed},tasks:{{t:{{}}}}")
    assert missing.key == "objectives[0].args.path" and "missing field 'task'" in str(missing)
    mixed.write_text('{"text": "a", "label": "x", "task": "t"}\n')
    none = refused(f"path:{mixed},tasks:{{u:{{}}}}")
    assert none.key == "objectives[0].args.path" and "no examples with task='u'" in str(none)
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


def _context(cfg: Any, model: Any, tokenizer: Any, labels: list[str] | None) -> Any:
    return objectives.Context(
        layout=Layout.of(objectives.multitask._bare(model).config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: {},
        tokenizer=tokenizer,
        labels=labels,
        data=cfg.data,
    )


def test_an_lm_head_task_and_a_classification_task_on_a_decoder(
    data_dir: Path, tmp_path: Path
) -> None:
    """A causal LM run (tiny LLaMA) with two extra tasks: fruit colors (its own
    classification head) and plain text (its own LM head, started from the run's)."""
    from transformers import AutoModelForCausalLM

    cfg = compose(tiny_overrides(data_dir))
    model, tokenizer = build(cfg.model)
    args = {
        "tasks": {
            "color": {"path": str(data_dir / "colors.jsonl")},
            "prose": {"path": str(data_dir / "text.txt"), "head": "lm", "weight": 2.0},
        },
        "sampling": "all",
    }
    term = objectives.build([TermConfig(name="multitask", args=args)])[0]
    streams = term.task_streams(cfg.data, tokenizer)
    assert term.labels["prose"] is None and term.specs["prose"].format == "text"
    wrapped = objectives.Objective(
        model, tasks.get(cfg.model), [term], _context(cfg, model, tokenizer, None)
    )
    prose = wrapped.terms["multitask"]["prose"]
    assert prose.model is model.model  # the shared decoder
    assert torch.equal(prose.lm_head.weight, model.lm_head.weight)  # from the run's LM head
    assert prose.lm_head.weight is not model.lm_head.weight  # but its own
    batch = {
        f"multitask/{t}": {
            **term.task_kind(t).collate(streams[t][:4], tokenizer.pad_token_id),
            "progress": torch.tensor(0.0),
        }
        for t in ("color", "prose")
    }
    main = tasks.get(cfg.model).collate(
        tasks.get(cfg.model).encode(
            [{"prompt": "color of plum?", "response": "purple"}], tokenizer, cfg.data, None
        ),
        tokenizer.pad_token_id,
    )
    wrapped.train()
    out = wrapped(**main, **batch)
    text = {k: v for k, v in batch["multitask/prose"].items() if k != "progress"}
    with torch.no_grad():
        logits = prose(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        labels = text["labels"][:, 1:]
        by_hand = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )
    assert float(out.terms["multitask_loss/prose"]) == pytest.approx(float(by_hand), rel=1e-5)
    color_loss = float(out.terms["multitask_loss/color"])
    assert float(out.terms["multitask"]) == pytest.approx(
        color_loss + 2.0 * float(by_hand), rel=1e-5
    )

    # The export: a plain LlamaForCausalLM for the LM task, the same logits.
    term.export(wrapped.state_dict(), model.state_dict(), tmp_path, tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "tasks" / "prose").eval()
    assert not (tmp_path / "tasks" / "prose" / "labels.json").exists()
    with torch.no_grad():
        got = plain(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
    assert torch.allclose(got, logits, atol=1e-5)


def test_tasks_from_one_file_by_their_task_field(data_dir: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (data_dir / "colors.jsonl").read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    with mixed.open("w") as f:
        for i, r in enumerate(rows):  # colors, and a second task on the same sentences
            f.write(json.dumps({**r, "kind": "color"}) + "\n")
            f.write(
                json.dumps(
                    {"text": r["text"], "label": "even" if i % 2 else "odd", "kind": "parity"}
                )
                + "\n"
            )
    cls = tiny_overrides(data_dir, task="classification")
    term = f"objectives=[{{name:multitask,args:{{path:{mixed},task_field:kind,tasks:{{color:{{}},parity:{{weight:0.5}}}}}}}}]"
    cfg = compose([*cls, term])
    preflight(cfg)
    mt = objectives.build(cfg.objectives)[0]
    train, held_out, labels = mt.read("color", cfg.data)
    assert len(train) + len(held_out) == len(rows)
    assert labels == sorted({r["label"] for r in rows})
    _, _, parity = mt.read("parity", cfg.data)
    assert parity == ["even", "odd"] and mt.task_weights == {"color": 1.0, "parity": 0.5}


def test_task_heads_under_lora_share_the_adapters_and_export_merged(
    data_dir: Path, tmp_path: Path
) -> None:
    import peft

    from jobs import strategies

    cfg = compose(tiny_overrides(data_dir, task="classification") + ["strategy=lora"])
    model, tokenizer = build(cfg.model, labels=LABELS)
    model = strategies.apply(model, cfg.strategy, Layout.of(model.config))
    assert isinstance(model, peft.PeftModel)
    term_cfg = TermConfig(
        name="multitask", args={"tasks": {"color": {"path": str(data_dir / "colors.jsonl")}}}
    )
    term = objectives.build([term_cfg])[0]
    streams = term.task_streams(cfg.data, tokenizer)
    wrapped = objectives.Objective(
        model, tasks.get(cfg.model), [term], _context(cfg, model, tokenizer, LABELS)
    )
    head = wrapped.terms["multitask"]["color"]
    assert head.bert is model.get_base_model().bert  # adapters injected: the same ones
    lora = [n for n, p in head.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for n, p in head.named_parameters() if "lora_" in n)
    assert head.classifier.weight.requires_grad
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in head.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    color = term.task_kind("color").collate(streams["color"][:4], tokenizer.pad_token_id)
    inputs = {"input_ids": color["input_ids"], "attention_mask": color["attention_mask"]}
    wrapped.eval()
    with torch.no_grad():
        expected = head(**inputs).logits
    merged = peft.PeftModel(  # what the export's merge does, from the same weights
        build(cfg.model, labels=LABELS)[0], model.peft_config["default"]
    )
    merged.load_state_dict(model.state_dict())
    term.export(wrapped.state_dict(), merged.merge_and_unload().state_dict(), tmp_path, tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tasks" / "color").eval()
    with torch.no_grad():
        got = plain(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_terms_trained_parameters_carry_into_the_next_phase(data_dir: Path) -> None:
    """A progressive run builds a new Objective per phase: its DANN classifier and task
    heads start from the previous phase's, the shared backbone is not copied twice."""
    cfg = compose(tiny_overrides(data_dir, task="classification"))
    configs = [
        TermConfig(name="dann", args={"target_path": str(data_dir / "target.jsonl")}),
        TermConfig(
            name="multitask", args={"tasks": {"color": {"path": str(data_dir / "colors.jsonl")}}}
        ),
    ]

    def objective() -> Any:
        model, tokenizer = build(cfg.model, labels=LABELS)
        terms = objectives.build(configs)
        terms[1].task_streams(cfg.data, tokenizer)
        return objectives.Objective(
            model, tasks.get(cfg.model), terms, _context(cfg, model, tokenizer, LABELS)
        )

    first = objective()
    with torch.no_grad():
        for p in first.terms.parameters():
            p.add_(0.5)  # "trained"
    state = objectives.trained_term_state(first)
    assert state and not any(".bert." in name for name in state)  # the backbone is the model's
    assert any(name.startswith("dann.") for name in state)
    assert any(name.startswith("multitask.color.classifier") for name in state)
    second = objective()
    assert not torch.equal(
        second.terms["multitask"]["color"].classifier.weight,
        first.terms["multitask"]["color"].classifier.weight,
    )
    objectives.load_term_state(second, state)
    own = dict(second.terms.named_parameters())
    for name, value in state.items():
        assert torch.equal(own[name], value), name
    with pytest.raises(RuntimeError, match="lost parameters"):
        objectives.load_term_state(second, {"dann.nothing": torch.zeros(1)})


def test_a_sweep_names_only_tasks_that_exist(data_dir: Path) -> None:
    from conf.schema import ParamSpec
    from jobs.sweep import check

    colors = data_dir / "colors.jsonl"
    term = f"objectives=[{{name:multitask,args:{{tasks:{{color:{{path:{colors}}}}}}}}}]"
    cls = tiny_overrides(data_dir, task="classification")

    def refused(metric: str, *extra: str) -> ConfigError:
        with pytest.raises(ConfigError) as e:
            compose(
                [*cls, *extra, f"sweep.objectives=[{{metric:{metric},mode:max}}]"], "sweep"
            ).check()
        return e.value

    unknown = refused("eval_accuracy/colour", term)
    assert unknown.key == "sweep.objectives[0].metric" and "['color']" in str(unknown)
    assert "lm head" not in str(refused("eval_perplexity/color", term))
    assert "classification head, not lm" in str(refused("eval_perplexity/color", term))
    assert "add the multitask term" in str(refused("eval_accuracy/mean"))
    assert "eval_accuracy/mean" in str(refused("eval_loss/mean", term))

    cfg = compose([*cls, term], "sweep")
    assert cfg.sweep is not None
    cfg.sweep.space["w"] = ParamSpec(
        key="objectives.multitask.args.tasks.colour.weight", type="float", low=0.1, high=1.0
    )
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert "has no 'colour' (it has ['color'])" in str(e.value)
