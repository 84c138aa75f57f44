"""DANN without Ray: the gradient-reversal layer, the lambda schedule, the term's value
against a hand-computed domain loss on one batch, its second data stream, and its bad
input named by key before any cluster is touched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conf.schema import ConfigError, TermConfig
from jobs import objectives, tasks
from jobs.config import compose
from jobs.models import Layout, build
from jobs.objectives import dann
from jobs.preflight import preflight
from tests.conftest import tiny_overrides


def test_the_gradient_reversal_layer_reverses_and_scales_the_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = dann.reverse_gradient(x, 0.3)
    assert torch.equal(y, x)  # identity forward
    (y * torch.arange(4.0)).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, -0.3 * torch.arange(4.0).expand(3, 4))


def test_the_ganin_schedule() -> None:
    assert dann.ganin_lambda(0.0) == 0.0
    assert dann.ganin_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann.ganin_lambda(1.0) > 0.9999
    term = dann.DANN(TermConfig(name="dann", args={"target_path": "t", "lambda": 0.5}))
    assert term.lambda_at(1.0) == pytest.approx(0.5 * dann.ganin_lambda(1.0))
    constant = dann.DANN(
        TermConfig(name="dann", args={"target_path": "t", "schedule": "constant", "lambda": 0.2})
    )
    assert constant.lambda_at(0.0) == constant.lambda_at(0.7) == 0.2


def _wrapped(data_dir: Path, weight: float = 1.0, **args: object):  # type: ignore[no-untyped-def]
    cfg = compose(tiny_overrides(data_dir, task="classification"))
    model, tok = build(cfg.model, labels=["neg", "pos"])
    context = objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: {},
    )
    term_cfg = TermConfig(
        name="dann", weight=weight, args={"target_path": str(data_dir / "target.jsonl"), **args}
    )
    wrapped = objectives.Objective(model, context.task, objectives.build([term_cfg]), context)
    term = wrapped.loss_terms[0]
    source = context.task.collate(
        context.task.encode(
            [{"text": "the film was great", "label": "pos"}, {"text": "awful", "label": "neg"}],
            tok,
            cfg.data,
            ["neg", "pos"],
        ),
        tok.pad_token_id,
    )
    encoded = term.encode(term.stream_records(cfg.data)[:3], tok, cfg.data)
    target = term.collate(encoded, tok.pad_token_id)
    return wrapped, model, source, target


def test_the_term_is_the_domain_loss_on_source_and_target_features(data_dir: Path) -> None:
    wrapped, model, source, target = _wrapped(data_dir, weight=0.5, schedule="constant")
    wrapped.train()
    torch.manual_seed(0)
    out = wrapped(**source, dann={**target, "progress": torch.tensor(0.25)})
    # by hand: the same features through the same classifier, labels 0 (source) / 1 (target)
    with torch.no_grad():
        feats = torch.cat(
            [
                dann.masked_mean(
                    model(**source, output_hidden_states=True).hidden_states[-1],
                    source["attention_mask"],
                ),
                dann.masked_mean(
                    model(**target, output_hidden_states=True).hidden_states[-1],
                    target["attention_mask"],
                ),
            ]
        )
        logits = wrapped.terms["dann"](feats).squeeze(-1)
        expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 0, 1, 1, 1]))
        task_loss = model(**source).loss
    assert float(out.terms["dann"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(task_loss + 0.5 * expected), rel=1e-5)
    accuracy = float(((logits > 0).float() == torch.tensor([0.0, 0, 1, 1, 1])).float().mean())
    assert float(out.terms["dann_domain_accuracy"]) == pytest.approx(accuracy)
    assert float(out.terms["dann_lambda"]) == 1.0
    # An eval forward has no target batch: the model's own outputs.
    wrapped.eval()
    assert torch.allclose(wrapped(**source).logits, model(**source).logits)


def test_the_backbone_gets_the_reversed_domain_gradient(data_dir: Path) -> None:
    """The domain term's gradient on the backbone is -lambda times the gradient of the
    same loss without the reversal; the classifier's is the plain one."""
    wrapped, model, source, target = _wrapped(data_dir, schedule="constant", **{"lambda": 0.5})
    wrapped.train()
    term = wrapped.loss_terms[0]
    classifier = wrapped.terms["dann"]
    backbone = model.bert.encoder.layer[-1].output.dense.weight
    stream = {**target, "progress": torch.tensor(0.0)}
    term.prepare({"dann": stream})
    reversed_loss = term.value(model(**source, output_hidden_states=True), source)
    g_rev = torch.autograd.grad(reversed_loss, [backbone, classifier[0].weight])

    def plain_loss() -> torch.Tensor:
        feats = torch.cat(
            [
                dann.masked_mean(
                    model(**s, output_hidden_states=True).hidden_states[-1], s["attention_mask"]
                )
                for s in (source, target)
            ]
        )
        logits = classifier(feats).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 0, 1, 1, 1]))

    g_plain = torch.autograd.grad(plain_loss(), [backbone, classifier[0].weight])
    assert torch.allclose(g_rev[0], -0.5 * g_plain[0], atol=1e-6)
    assert torch.allclose(g_rev[1], g_plain[1], atol=1e-6)
    # The classifier is left out of the export's state dict.
    assert set(objectives.model_state_dict(wrapped.state_dict())) == set(model.state_dict())


def _error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        preflight(compose(overrides))
    return info.value


@pytest.mark.parametrize(
    ("args", "key", "says"),
    [
        ("{}", "objectives[0].args.target_path", "unlabelled target-domain data"),
        ("{target_path:/no/such.jsonl}", "objectives[0].args.target_path", "/no/such.jsonl"),
        ("{target_path:TARGET,schedule:cosine}", "objectives[0].args.schedule", "'ganin'"),
        ("{target_path:TARGET,lambda:-1}", "objectives[0].args.lambda", ">= 0"),
        ("{target_path:TARGET,hidden:0}", "objectives[0].args.hidden", ">= 1"),
        ("{target_path:TARGET,width:3}", "objectives[0].args", "unknown ['width']"),
        ("{target_path:LABELLED}", "objectives[0].args.target_path", "['label']"),
        (
            "{target_path:TARGET,target_eval_path:TARGET}",  # unlabelled: no label field
            "objectives[0].args.target_eval_path",
            "label",
        ),
        (
            "{target_path:TARGET,target_eval_path:/no/such.jsonl}",
            "objectives[0].args.target_eval_path",
            "does not exist",
        ),
    ],
)
def test_bad_dann_settings_are_rejected_before_ray(
    data_dir: Path, args: str, key: str, says: str
) -> None:
    args = args.replace("LABELLED", str(data_dir / "target_eval.jsonl"))
    args = args.replace("TARGET", str(data_dir / "target.jsonl"))
    err = _error(
        tiny_overrides(data_dir, task="classification")
        + [f"objectives=[{{name:dann,args:{args}}}]"]
    )
    assert err.key == key and says in str(err), str(err)


def test_a_language_model_aligns_its_hidden_states_too(data_dir: Path) -> None:
    """Instruction tuning on the source domain, unlabelled text from the target: the
    term is the domain loss on the mean last hidden states, as for classification."""
    target = data_dir / "target.jsonl"
    cfg = compose(
        tiny_overrides(data_dir) + [f"objectives=[{{name:dann,args:{{target_path:{target}}}}}]"]
    )
    preflight(cfg)  # allowed
    model, tok = build(cfg.model)
    context = objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: {},
    )
    wrapped = objectives.Objective(model, context.task, objectives.build(cfg.objectives), context)
    term = wrapped.loss_terms[0]
    records = [{"prompt": "color of lime?", "response": "green"}, {"prompt": "a?", "response": "b"}]
    source = context.task.collate(context.task.encode(records, tok, cfg.data, None), 0)
    stream = term.collate(term.encode(term.stream_records(cfg.data)[:3], tok, cfg.data), 0)
    wrapped.train()
    out = wrapped(**source, dann={**stream, "progress": torch.tensor(1.0)})
    with torch.no_grad():
        feats = torch.cat(
            [
                dann.masked_mean(
                    model(**b, output_hidden_states=True).hidden_states[-1], b["attention_mask"]
                )
                for b in (source, {k: stream[k] for k in ("input_ids", "attention_mask")})
            ]
        )
        logits = wrapped.terms["dann"](feats).squeeze(-1)
        expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 0, 1, 1, 1]))
    assert float(out.terms["dann"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(
        float(model(**source).loss.detach() + expected),
        rel=1e-5,  # weight 1 (the default)
    )
