"""EWC and the forgetting probe without Ray: the Fisher against a hand-computed one, the
penalty 0 at the start and equal to a hand-computed one after a step, the Fisher read
back from the run directory (a resume does not recompute it), and bad input named by
key before Ray."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conf.schema import ConfigError, TermConfig
from jobs import data as data_lib
from jobs import objectives, tasks
from jobs.config import compose
from jobs.models import Layout, build
from jobs.objectives import ewc
from jobs.objectives.l2sp import pretrained_name
from jobs.preflight import preflight
from tests.conftest import tiny_overrides, write_teacher


def _context(cfg: Any, model: Any, tokenizer: Any, run_dir: Path) -> objectives.Context:
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    return objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=0,
        pretrained=lambda: initial,
        tokenizer=tokenizer,
        labels=None,
        data=cfg.data,
        micro_batch_size=4,
        run_dir=run_dir,
    )


def test_fisher_and_penalty_match_a_hand_computation(data_dir: Path, tmp_path: Path) -> None:
    cfg = compose(tiny_overrides(data_dir))
    model, tokenizer = build(cfg.model)
    reference = copy.deepcopy(model)
    context = _context(cfg, model, tokenizer, tmp_path)
    source = str(data_dir / "text.txt")  # plain text for a language model
    term = TermConfig(
        name="ewc", weight=1.0, args={"source_path": source, "batches": 3, "normalize": "none"}
    )
    wrapped = objectives.Objective(model, context.task, objectives.build([term]), context)

    # The Fisher by hand: the same 3 micro batches of the text file, squared gradients.
    records, data = data_lib.read_extra(source, cfg.data, context.task, key="k", labels=None)
    assert data.task == "text"
    encoded = context.task.encode(records, tokenizer, data, None)
    batches = data_lib.eval_batches(
        encoded,
        rank=0,
        world_size=1,
        micro_batch_size=4,
        pad_id=tokenizer.pad_token_id,
        collate_fn=context.task.collate,
    )[:3]
    hand = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    reference.eval()
    for batch, _ in batches:
        reference.zero_grad()
        reference(**batch).loss.backward()
        for n, p in reference.named_parameters():
            hand[n] += p.grad.pow(2)
    stored = load_file(tmp_path / ewc.FISHER_FILE)  # written with the run
    heads = [n for n in hand if context.layout.locate(n).kind == "head"]
    assert heads and not set(heads) & set(stored)  # the heads are left out
    assert set(stored) == set(hand) - set(heads)
    for n, f in stored.items():
        assert torch.allclose(f, hand[n] / 3, rtol=1e-4, atol=1e-12), n

    batch, _ = batches[0]
    wrapped.train()
    out = wrapped(**batch)
    assert out.terms["ewc"].item() == 0.0  # at the starting weights
    with torch.no_grad():  # move every penalised weight
        for n, p in model.named_parameters():
            if pretrained_name(n) in stored:
                p.add_(0.01 * torch.randn_like(p))
    out = wrapped(**batch)
    expected = sum(
        (stored[pretrained_name(n)] * (p - reference.state_dict()[n]).pow(2)).sum()
        for n, p in model.named_parameters()
        if pretrained_name(n) in stored and p.requires_grad
    )
    assert out.terms["ewc"].item() == pytest.approx(float(expected.detach()), rel=1e-4)
    assert out.terms["ewc"].item() > 0


def test_a_resumed_run_reads_the_fisher_it_stored(data_dir: Path, tmp_path: Path) -> None:
    cfg = compose(tiny_overrides(data_dir))
    model, tokenizer = build(cfg.model)
    fake = {
        pretrained_name(n): torch.full_like(p, 3.0)
        for n, p in model.named_parameters()
        if Layout.of(model.config).locate(n).kind != "head"
    }
    save_file(fake, str(tmp_path / ewc.FISHER_FILE))
    context = _context(cfg, model, tokenizer, tmp_path)
    term = ewc.EWC(TermConfig(name="ewc", args={"source_path": str(data_dir / "nope.txt")}))
    fisher = term.fisher(model, context)  # the source file is never read
    assert all(torch.equal(fisher[k], v) for k, v in fake.items())


def test_mean_normalisation(data_dir: Path, tmp_path: Path) -> None:
    cfg = compose(tiny_overrides(data_dir))
    model, tokenizer = build(cfg.model)
    term = ewc.EWC(TermConfig(name="ewc", args={"source_path": str(data_dir / "text.txt")}))
    fisher = term.fisher(model, _context(cfg, model, tokenizer, tmp_path))
    total = sum(float(f.sum()) for f in fisher.values())
    assert total / sum(f.numel() for f in fisher.values()) == pytest.approx(1.0, rel=1e-4)


def test_bad_input_is_named_before_ray(data_dir: Path, tmp_path: Path) -> None:
    llm = tiny_overrides(data_dir)
    text = data_dir / "text.txt"

    def refused(overrides: list[str]) -> ConfigError:
        with pytest.raises(ConfigError) as e:
            preflight(compose(overrides))
        return e.value

    def term(args: str) -> str:
        return f"objectives=[{{name:ewc,weight:1.0,args:{{{args}}}}}]"

    assert refused([*llm, term("batches:4")]).key == "objectives[0].args.source_path"
    assert (
        refused([*llm, term(f"source_path:{text},batches:0")]).key == "objectives[0].args.batches"
    )
    assert (
        refused([*llm, term(f"source_path:{text},normalize:max")]).key
        == "objectives[0].args.normalize"
    )
    assert "unknown ['lam']" in str(refused([*llm, term(f"source_path:{text},lam:1")]))
    assert (
        refused([*llm, term(f"source_path:{tmp_path / 'x.txt'}")]).key
        == "objectives[0].args.source_path"
    )
    lora = refused([*llm, "strategy=lora", term(f"source_path:{text}")])
    assert lora.key == "objectives[0].name" and "trains none" in str(lora)
    negative = refused([*llm, f"objectives=[{{name:ewc,weight:-1,args:{{source_path:{text}}}}}]"])
    assert negative.key == "objectives[0].weight"
    # classification from a new, random head: the Fisher would measure nothing
    cls = tiny_overrides(data_dir, task="classification")
    new_head = refused([*cls, term(f"source_path:{data_dir / 'cls.jsonl'}")])
    assert new_head.key == "objectives[0].name" and "already predicts" in str(new_head)
    # ... from a model fine-tuned on the source labels it is fine
    source_model = write_teacher(tmp_path / "a", data_dir, labels=["neg", "pos"])
    fine_tuned = ["model=hf", f"model.path={source_model}", "model.task=sequence_classification"]
    preflight(compose([*cls, *fine_tuned, term(f"source_path:{data_dir / 'cls.jsonl'}")]))
    # the forgetting probe's file: read as the workers will, labels among the run's
    assert refused([*llm, f"eval.source_path={tmp_path / 'none.jsonl'}"]).key == "eval.source_path"
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "x", "label": "maybe"}\n')
    message = refused([*cls, f"eval.source_path={odd}"])
    assert message.key == "eval.source_path" and "'maybe'" in str(message)
    preflight(compose([*llm, f"eval.source_path={text}"]))


def test_forgetting_as_a_sweep_objective_needs_the_probe(data_dir: Path) -> None:
    objectives = "sweep.objectives=[{metric:eval_loss,mode:min},{metric:forgotten_loss,mode:min}]"
    with pytest.raises(ConfigError) as e:
        compose([*tiny_overrides(data_dir), objectives], "sweep").check()
    assert e.value.key == "sweep.objectives[1].metric" and "eval.source_path" in str(e.value)
    probe = f"eval.source_path={data_dir / 'text.txt'}"
    compose([*tiny_overrides(data_dir), objectives, probe], "sweep").check()
