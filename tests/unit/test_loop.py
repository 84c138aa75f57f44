"""The loop's rooms without Ray: tasks (eval sums, metrics against scikit-learn),
progressive schedules (phases, trainable sets), loss terms (L2-SP on a tiny model), the
test split, and every bad input named by its key before any cluster is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score

from conf.schema import ConfigError, StrategyConfig, TermConfig
from jobs import data, objectives, strategies, tasks
from jobs.config import compose
from jobs.models import Layout, build
from jobs.preflight import preflight
from jobs.strategies import progressive
from tests.conftest import tiny_overrides


# --------------------------------------------------------------------------- tasks
def test_classification_metrics_match_scikit_learn() -> None:
    task = tasks.get("sequence_classification")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=gen)
    labels = torch.randint(0, 5, (200,), generator=gen)
    labels[:3] = 4  # a class the model may never predict
    # Sums over two shards add up to the sums of the whole (what all_reduce relies on).
    sums = task.eval_sums(logits[:120], labels[:120]) + task.eval_sums(logits[120:], labels[120:])
    out = task.metrics(sums, "eval", confusion=True)
    predicted = logits.argmax(-1).numpy()
    assert out["eval_macro_f1"] == pytest.approx(
        f1_score(labels.numpy(), predicted, average="macro")
    )
    assert (
        out["eval_confusion"]
        == confusion_matrix(labels.numpy(), predicted, labels=range(5)).tolist()
    )
    assert out["eval_accuracy"] == pytest.approx(
        float((logits.argmax(-1) == labels).float().mean())
    )
    assert out["eval_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6
    )


def test_every_task_gives_an_example_batch_its_model_takes() -> None:
    for name, overrides in (
        ("causal_lm", ["model=tiny_llama", "data=wordnet_instruct"]),
        ("sequence_classification", ["model=tiny_bert"]),
    ):
        cfg = compose(overrides)
        task = tasks.get(cfg.model)
        assert task.name == name
        model, tok = build(cfg.model, labels=["a", "b", "c"])
        batch = task.example_batch(batch_size=2, seq_len=8, vocab=len(tok), num_labels=3)
        out = model(**batch)
        assert task.loss(out, batch).dim() == 0
        metrics = task.metrics(task.eval_sums(out.logits, batch["labels"]), "eval")
        assert {"eval_loss", "eval_accuracy"} <= set(metrics)


def test_no_task_branches_outside_the_tasks_folder() -> None:
    root = Path(__file__).parents[2] / "jobs"
    for path in root.rglob("*.py"):
        if "tasks" in path.parts:
            continue
        text = path.read_text()
        for pattern in (
            "task ==",
            "task !=",
            '"sequence_classification" if',
            'ForSequenceClassification" in',
        ):
            if pattern in text and path.name != "lora.py":
                pytest.fail(f"{path.relative_to(root)} branches on the task ({pattern!r})")


# --------------------------------------------------------------------------- phases
def _progressive(**kw: object) -> StrategyConfig:
    cfg = StrategyConfig(name="progressive", num_trainable_blocks=kw.pop("start", 0))
    for key, value in kw.items():
        setattr(cfg.progressive, key, value)
    cfg.check()
    return cfg


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"unfreeze_every": 10}, [(0, 10, 0), (10, 20, 1), (20, 30, 2), (30, 40, 3), (40, 100, 4)]),
        ({"unfreeze_every": 30}, [(0, 30, 0), (30, 60, 1), (60, 90, 2), (90, 100, 3)]),
        ({"unfreeze": [0.25, 0.5], "final_blocks": 2}, [(0, 25, 0), (25, 50, 1), (50, 100, 2)]),
        ({"unfreeze": [5, 60], "blocks_per_phase": 2}, [(0, 5, 0), (5, 60, 2), (60, 100, 4)]),
        ({"final_blocks": 3, "start": 1}, [(0, 33, 1), (33, 67, 2), (67, 100, 3)]),
    ],
)
def test_progressive_schedules(kw: dict[str, object], expected: list[tuple[int, int, int]]) -> None:
    phases = strategies.phases(_progressive(**kw), max_steps=100, num_blocks=4)
    assert [(p.start_step, p.end_step, p.trainable_blocks) for p in phases] == expected
    assert [p.index for p in phases] == list(range(len(phases)))
    assert all(p.strategy.name == "freeze_depth" for p in phases)


def test_one_phase_strategies() -> None:
    (phase,) = strategies.phases(StrategyConfig(name="lora"), max_steps=50, num_blocks=4)
    assert (phase.start_step, phase.end_step, phase.trainable_blocks) == (0, 50, None)


@pytest.mark.parametrize("base", ["freeze_depth", "lora"])
def test_each_phase_trains_the_top_blocks(base: str) -> None:
    cfg = compose(["model=tiny_llama", "data=wordnet_instruct"])
    cfg.strategy = _progressive(unfreeze_every=5, final_blocks=3, base=base, start=1)
    layout = None
    seen = []
    for phase in strategies.phases(cfg.strategy, max_steps=20, num_blocks=4):
        model, _ = build(cfg.model)
        layout = layout or Layout.of(model.config)
        model = strategies.apply_phase(model, phase, layout)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        blocks = {layout.locate(n).block for n in trained if layout.locate(n).kind == "block"}
        assert blocks == set(range(4 - phase.trainable_blocks, 4)), phase
        if base == "lora":  # adapters in the final 3 blocks from the start; only lora_ trains
            assert trained and all("lora_" in n for n in trained)
            assert sum("lora_A" in n for n, _ in model.named_parameters()) == 3 * 4
        seen.append(len(trained))
    assert seen == sorted(seen) and len(set(seen)) == 3


def test_the_lr_schedule_continues_across_phases() -> None:
    from jobs import engine

    train = compose(["train.max_steps=20", "train.warmup_steps=0", "train.schedule=linear"]).train
    whole = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    one = engine.scheduler(whole, train)
    expected = []
    for _ in range(20):
        expected.append(one.get_last_lr()[0])
        whole.step()
        one.step()
    second = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    later = engine.scheduler(second, train, start_step=8, rewarmup_steps=3)
    got = []
    for _ in range(12):
        got.append(later.get_last_lr()[0])
        second.step()
        later.step()
    assert got[3:] == pytest.approx(expected[11:])  # after the re-warmup: the run's schedule
    assert got[:3] == pytest.approx([expected[8 + i] * (i + 1) / 4 for i in range(3)])


# --------------------------------------------------------------------------- L2-SP
def test_l2sp_is_zero_at_the_start_and_its_gradient_pulls_back() -> None:
    cfg = compose(["model=tiny_llama", "data=wordnet_instruct", "strategy=full"])
    model, tok = build(cfg.model)
    layout = Layout.of(model.config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    term = objectives.build([TermConfig(name="l2sp", weight=1.0)])
    context = objectives.Context(
        layout=layout, task=tasks.get(cfg.model), zero_stage=0, pretrained=lambda: initial
    )
    wrapped = objectives.Objective(model, context.task, term, context)
    batch = context.task.example_batch(batch_size=2, seq_len=8, vocab=len(tok), num_labels=0)
    wrapped.train()
    out = wrapped(**batch)
    assert float(out.terms["l2sp"]) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    out = wrapped(**batch)
    n = sum(p.numel() for name, p in model.named_parameters() if layout.locate(name).kind != "head")
    assert float(out.terms["l2sp"]) == pytest.approx(n * 1e-4, rel=1e-3)
    # The term's gradient is 2 x weight x (w - w0) = 0.02 on every moved weight.
    norm = model.model.norm.weight
    (total,) = torch.autograd.grad(wrapped(**batch).loss, [norm])
    (plain,) = torch.autograd.grad(model(**batch).loss, [norm])
    assert torch.allclose(total - plain, torch.full_like(norm, 0.02), atol=1e-5)
    # The reference is left out of the export's state dict.
    state = objectives.model_state_dict(wrapped.state_dict())
    assert set(state) == set(model.state_dict())


# --------------------------------------------------------------------------- test split
def test_test_fraction_and_given_files(data_dir: Path, tmp_path: Path) -> None:
    cfg = compose(
        tiny_overrides(data_dir, task="classification") + ["data.test_fraction=0.25"]
    ).data
    ds = data.load(cfg)
    assert (len(ds.test), len(ds.eval), len(ds.train)) == (60, 36, 144)
    ids = [{id(r) for r in part} for part in (ds.train, ds.eval, ds.test)]
    assert not (ids[0] & ids[2]) and not (ids[1] & ids[2]) and not (ids[0] & ids[1])
    # The user's own eval and test files are used exactly; nothing is split off then.
    rows = [json.loads(line) for line in (data_dir / "cls.jsonl").read_text().splitlines()]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
    (tmp_path / "test.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[7:12])
    )
    given = compose(
        tiny_overrides(data_dir, task="classification")
        + [f"data.eval_path={tmp_path / 'eval.jsonl'}", f"data.test_path={tmp_path / 'test.csv'}"]
    ).data
    ds = data.load(given)
    assert [r["text"] for r in ds.eval] == [r["text"] for r in rows[:7]]
    assert [r["text"] for r in ds.test] == [r["text"] for r in rows[7:12]]
    assert len(ds.train) == 240


# --------------------------------------------------------------------------- bad input
def _error(overrides: list[str], *, preflight_too: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg = compose(overrides)
        if preflight_too:
            preflight(cfg)
    return info.value


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        (["strategy.progressive.unfreeze=[4,2]"], "strategy.progressive.unfreeze", "out of order"),
        (
            ["strategy.progressive.unfreeze=[4,12]"],
            "strategy.progressive.unfreeze",
            "train.max_steps=12",
        ),
        (["strategy.progressive.unfreeze=[0.5,2]"], "strategy.progressive.unfreeze", "mixes"),
        (
            ["strategy.progressive.unfreeze=[2,4,6,8,10]"],
            "strategy.progressive.unfreeze",
            "beyond the final depth",
        ),
        (
            ["strategy.progressive.unfreeze_every=12"],
            "strategy.progressive.unfreeze_every",
            "1..11",
        ),
        (
            ["strategy.progressive.unfreeze_every=3", "strategy.progressive.unfreeze=[3]"],
            "strategy.progressive.unfreeze_every",
            "not both",
        ),
        (["strategy.progressive.final_blocks=5"], "strategy.progressive.final_blocks", "1..4"),
        (
            ["strategy.num_trainable_blocks=3", "strategy.progressive.final_blocks=2"],
            "strategy.num_trainable_blocks",
            "0..1",
        ),
        (["strategy.progressive.base=adapter"], "strategy.progressive.base", "'lora'"),
        (["train.early_stopping.enabled=true"], "train.early_stopping.enabled", "progressive"),
        (
            ["strategy.progressive.base=lora"],
            "strategy.num_trainable_blocks",
            "nothing would train",
        ),
    ],
)
def test_bad_progressive_schedules_are_rejected(
    data_dir: Path, extra: list[str], key: str, says: str
) -> None:
    err = _error(tiny_overrides(data_dir) + ["strategy=progressive", *extra])
    assert err.key == key and says in str(err), str(err)


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        (["objectives=[{name:l2sp,weight:-0.1}]"], "objectives[0].weight", ">= 0"),
        (["objectives=[{name:mixout}]"], "objectives[0].name", "'l2sp'"),
        (["objectives=[{name:l2sp},{name:l2sp}]"], "objectives[1].name", "twice"),
        (["strategy=lora", "objectives=[{name:l2sp}]"], "objectives[0].name", "trains none"),
        (
            ["strategy=feature_extraction", "objectives=[{name:l2sp}]"],
            "objectives[0].name",
            "trains none",
        ),
        (["objectives=[{name:l2sp,args:{target:head}}]"], "objectives[0].args", "no args"),
        (["data.test_fraction=1.0"], "data.test_fraction", "[0, 1)"),
        (["data.test_fraction=0.85"], "data.test_fraction", "nothing to train on"),
        (["data.test_path=/no/such/test.jsonl"], "data.test_path", "/no/such/test.jsonl"),
        (["data.eval_path=/no/such/eval.csv"], "data.eval_path", "/no/such/eval.csv"),
    ],
)
def test_bad_terms_and_splits_are_rejected(
    data_dir: Path, extra: list[str], key: str, says: str
) -> None:
    err = _error(tiny_overrides(data_dir) + extra)
    assert err.key == key and says in str(err), str(err)


def test_a_test_file_with_an_unknown_label_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"text": "meh", "label": "neutral"}\n')
    err = _error(tiny_overrides(data_dir, task="classification") + [f"data.test_path={bad}"])
    assert err.key == "data.test_path" and "'neutral'" in str(err)
    broken = tmp_path / "eval.jsonl"
    broken.write_text('{"text": "fine", "label": "pos"}\n{"text": oops}\n')
    err = _error(tiny_overrides(data_dir, task="classification") + [f"data.eval_path={broken}"])
    assert err.key == "data.eval_path" and f"{broken}:2" in str(err)


def test_progressive_depths_helper() -> None:
    assert progressive.depths(_progressive(unfreeze_every=3), 6) == (0, 6)
