"""The fine-tuning job on a real local Ray with real DeepSpeed over gloo, 2 workers.

    pytest tests/integration -m integration

Every run here is a complete `jobs.finetune` run: Ray Train gang, DeepSpeed engine,
checkpoints, Hugging Face export. The export is then loaded with plain transformers/peft
and scored again. Runs that need no crash between them share one Train gang
(``run_many``, the `gang` fixture): the gang's start-up (~15 s here) is paid once, and
each run still builds its own model, engine(s), checkpoints and export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conf.schema import FinetuneConfig
from jobs import data as data_lib
from jobs import runlog
from jobs.config import compose
from jobs.evaluate import evaluate
from jobs.finetune import run, run_many
from tests.conftest import tiny_overrides, write_teacher

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_2cpus")]


def _run(
    tmp_path: Path, overrides: list[str], name: str = "run"
) -> tuple[FinetuneConfig, list[dict[str, Any]]]:
    cfg = compose(overrides + [f"run.output_dir={tmp_path}", f"run.name={name}"])
    summary = run(cfg, show_progress=False)
    return cfg, runlog.read(summary.run_dir)


STAGES = [0, 2, 3]
STRATEGIES = {
    "full": ["strategy=full"],
    "freeze_depth+lr_ratio": [
        "strategy=freeze_depth",
        "strategy.num_trainable_blocks=2",
        "strategy.lr_ratio=0.5",
    ],
    "lora": ["strategy=lora", "strategy.lora.r=8"],
}
L2SP = "objectives=[{name:l2sp,weight:0.01}]"


def l2sp_and_ewc(data_dir: Path) -> list[str]:
    """L2-SP and EWC (its Fisher from plain text) side by side, and the forgetting probe
    on that text."""
    text = data_dir / "text.txt"
    return [
        f"objectives=[{{name:l2sp,weight:0.01}},{{name:ewc,weight:0.01,args:{{source_path:{text}}}}}]",
        f"eval.source_path={text}",
    ]


DANN_RUN = [
    "train.max_steps=20",
    "train.lr=2e-3",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "data.max_length=48",
]
# The matrix runs also carry checks that need the same kind of run: freeze_depth under
# ZeRO-0 and ZeRO-3 with the L2-SP and EWC terms (the same penalties under both) and the
# forgetting probe, under ZeRO-2 with the L2-SP term at weight 0 (logged, no effect: the
# reference for "l2sp-strong"); LoRA under ZeRO-3 also writes the merged export.
MATRIX_EXTRA: dict[tuple[str, int], Any] = {
    ("freeze_depth+lr_ratio", 0): l2sp_and_ewc,
    ("freeze_depth+lr_ratio", 3): l2sp_and_ewc,
    ("freeze_depth+lr_ratio", 2): ["objectives=[{name:l2sp,weight:0.0}]"],
    ("lora", 3): ["run.export_merged=true"],
}
# Progressive unfreezing under every ZeRO stage (and over LoRA): 3 phases of 4 steps,
# from the head alone to 2 blocks.
PROGRESSIVE = {f"zero{stage}": [f"deepspeed=zero{stage}"] for stage in (0, 1, 2, 3)} | {
    # lr 3e-2 with the optimizer reset at each unfreeze spiked the loss past where it
    # started on this machine's floats (Adam's first steps are ~lr each); re-warm instead.
    "zero3-lora": [
        "deepspeed=zero3",
        "strategy.progressive.base=lora",
        "train.lr=1e-2",
        "strategy.progressive.rewarmup_steps=2",
    ]
}


def dann_term(data_dir: Path) -> str:
    target, labelled = data_dir / "target.jsonl", data_dir / "target_eval.jsonl"
    return (
        "objectives=[{name:dann,weight:0.1,"
        f"args:{{target_path:{target},target_eval_path:{labelled}}}}}]"
    )


def distill_term(teacher: Path) -> str:
    return f"objectives=[{{name:distill,args:{{teacher:{teacher},alpha:0.5,temperature:2.0}}}}]"


def multitask_term(data_dir: Path) -> str:
    colors = data_dir / "colors.jsonl"
    return f"objectives=[{{name:multitask,args:{{tasks:{{color:{{path:{colors},weight:1.0}}}}}}}}]"


def multitask_lm_terms(data_dir: Path) -> str:
    colors, prose, target = (data_dir / n for n in ("colors.jsonl", "prose.txt", "target.jsonl"))
    tasks = f"color:{{path:{colors}}},prose:{{path:{prose},head:lm}}"
    return (
        f"objectives=[{{name:multitask,args:{{tasks:{{{tasks}}},sampling:all}}}},"
        f"{{name:dann,weight:0.1,args:{{target_path:{target}}}}}]"
    )


def _gang_runs(data_dir: Path, teacher: Path) -> dict[str, list[str]]:
    """Every run of this module that needs no crash in between, by name."""
    runs: dict[str, list[str]] = {}
    llm, cls = tiny_overrides(data_dir), tiny_overrides(data_dir, task="classification")
    for stage in STAGES:
        for sid, strategy in STRATEGIES.items():
            extra = MATRIX_EXTRA.get((sid, stage), [])
            extra = extra(data_dir) if callable(extra) else extra
            runs[f"matrix-{sid}-{stage}"] = llm + strategy + [f"deepspeed=zero{stage}"] + extra
    runs["early"] = llm + [
        "deepspeed=zero2",
        "train.eval_every=3",
        "train.early_stopping.enabled=true",
        "train.early_stopping.mode=max",
        "train.early_stopping.patience=1",
    ]
    runs["classify"] = cls + [
        "deepspeed=zero3",
        "train.max_steps=40",
        "train.lr=1e-3",
        "train.schedule=linear",
        "data.max_length=48",
        "train.eval_every=20",
        "train.checkpoint_every=20",
        "run.loggers=[tensorboard,mlflow]",
    ]
    runs["offload-bf16-lora"] = llm + [
        "deepspeed=zero3_offload",
        "deepspeed.bf16=true",
        "strategy=lora",
    ]
    for pid, extra in PROGRESSIVE.items():
        lora = "lora" in pid  # LoRA: no new head, so it starts with one block of adapters
        runs[f"progressive-{pid}"] = llm + [
            "strategy=progressive",
            "strategy.progressive.unfreeze_every=4",
            f"strategy.progressive.final_blocks={3 if lora else 2}",
            f"strategy.num_trainable_blocks={1 if lora else 0}",
            *extra,
        ]
    runs["l2sp-strong"] = (
        llm
        + STRATEGIES["freeze_depth+lr_ratio"]
        + ["deepspeed=zero2", "objectives=[{name:l2sp,weight:1.0}]"]
    )
    for stage in (2, 3):  # DANN: the target domain's stream beside the source batches
        runs[f"dann-zero{stage}"] = cls + [f"deepspeed=zero{stage}", *DANN_RUN, dann_term(data_dir)]
    for stage in (2, 3):  # distillation from a smaller, trained teacher
        runs[f"distill-zero{stage}"] = cls + [
            f"deepspeed=zero{stage}",
            *DANN_RUN,
            "train.max_steps=40",  # the tiny student starts to separate the labels at ~30
            "train.eval_every=20",
            "train.checkpoint_every=20",
            distill_term(teacher),
        ]
    for stage in (2, 3):  # a second task (fruit colors, 6 labels) on its own head
        runs[f"multitask-zero{stage}"] = cls + [
            f"deepspeed=zero{stage}",
            *DANN_RUN,
            "train.max_steps=30",
            "train.eval_every=15",
            "train.checkpoint_every=15",
            multitask_term(data_dir),
        ]
    # Task heads over LoRA: the extra head shares the adapters; its export is merged.
    runs["multitask-lora"] = cls + [
        "deepspeed=zero2",
        "strategy=lora",
        "strategy.lora.r=8",
        *DANN_RUN,
        "train.lr=1e-2",
        multitask_term(data_dir),
    ]
    # A decoder with progressive unfreezing, a classification task and an LM task beside
    # its own, and DANN: every term's trained parameters carry over at each unfreeze.
    runs["multitask-progressive-lm"] = llm + [
        "deepspeed=zero3",
        "strategy=progressive",
        "strategy.progressive.unfreeze_every=6",
        "strategy.progressive.final_blocks=2",
        "strategy.num_trainable_blocks=0",
        "train.max_steps=18",
        multitask_lm_terms(data_dir),
    ]
    runs["l2sp-progressive-classify"] = cls + [
        "deepspeed=zero3",
        "strategy=progressive",
        "strategy.progressive.unfreeze_every=10",
        "train.max_steps=40",
        "train.lr=1e-3",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "data.max_length=48",
        "data.test_fraction=0.2",
        L2SP,
    ]
    return runs


@pytest.fixture(scope="module")
def gang(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_2cpus: None
) -> dict[str, Any]:
    """All the runs above in one Train gang; ZeRO-3 runs last (DeepSpeed leaves its
    ZeRO-3 linear in place of F.linear for the rest of the process)."""
    out = tmp_path_factory.mktemp("gang")
    teacher = write_teacher(out / "teacher", data_dir, labels=["neg", "pos"], train_steps=60)
    runs = _gang_runs(data_dir, teacher)
    order = sorted(runs, key=lambda name: any("zero3" in o for o in runs[name]))
    cfgs = {
        name: compose(runs[name] + [f"run.output_dir={out}", f"run.name={name}"]) for name in order
    }
    summaries = run_many([cfgs[name] for name in order], show_progress=False)
    out_runs: dict[str, Any] = {
        name: (cfgs[name], runlog.read(s.run_dir), s.run_dir)
        for name, s in zip(order, summaries, strict=True)
    }
    out_runs["_reported"] = [(name, s.reported) for name, s in zip(order, summaries, strict=True)]
    return out_runs


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _event(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in records if r.get("event") == name)


def score_export(export_dir: Path, cfg: FinetuneConfig, split: str = "eval") -> float:
    """Loss of the exported model on a split, loaded with plain transformers / peft."""
    classify = cfg.model.task == "sequence_classification"
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    if (export_dir / "adapter").is_dir():
        adapter = export_dir / "adapter"
        base_path = json.loads((adapter / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        model = peft.PeftModel.from_pretrained(auto.from_pretrained(base_path), adapter)
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    else:
        model = auto.from_pretrained(export_dir)
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    dataset = data_lib.load(cfg.data)
    labels = json.loads((export_dir / "labels.json").read_text()) if classify else None
    encoded = data_lib.encode(getattr(dataset, split), tokenizer, cfg.data, labels)
    batches = data_lib.eval_batches(
        encoded, rank=0, world_size=1, micro_batch_size=8, pad_id=tokenizer.pad_token_id
    )
    model.eval()
    return evaluate(model, batches)["eval_loss"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_loss_falls_and_the_export_reproduces_the_final_eval(
    gang: dict[str, Any], stage: int, strategy: str
) -> None:
    cfg, records, run_dir = gang[f"matrix-{strategy}-{stage}"]
    start, end = _event(records, "start"), _event(records, "end")
    assert start["world_size"] == 2 and start["global_batch"] == 16
    assert _event(records, "baseline")["eval_loss"] - end["eval_loss"] > 0.3, (
        "eval loss did not fall"
    )
    losses = list(_losses(records).values())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, "train loss did not fall"
    if cfg.strategy.name == "freeze_depth":
        assert set(start["lr"]) == {"block.2", "block.3", "other", "head"}
        assert start["lr"]["block.2"] == pytest.approx(0.5 * start["lr"]["block.3"])
    # The exported model, loaded with plain transformers/peft, scores what training ended on.
    assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_the_driver_gets_the_last_runs_result_through_ray(gang: dict[str, Any]) -> None:
    """trainer.fit()'s Result carries the final metrics of the run the gang trained last
    (what a driver without shared storage summarises from); they are the end record's."""
    reported = gang["_reported"]
    assert [bool(r) for _, r in reported] == [False] * (len(reported) - 1) + [True]
    name, result = reported[-1]
    end = _event(gang[name][1], "end")
    assert result["final"] == 1 and result["step"] == end["step"]
    for key in ("eval_loss", "eval_accuracy", "trainable_params"):
        assert result[key] == pytest.approx(end[key]), key


def test_early_stopping_stops_all_workers_and_exports_the_best(gang: dict[str, Any]) -> None:
    # mode=max on a falling eval loss: the first eval is the best, the next one exhausts patience.
    cfg, records, run_dir = gang["early"]
    end = _event(records, "end")
    assert end["stopped_early"] and end["step"] == 6 and end["best_step"] == 3
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "event" not in r}
    assert evals[6] < evals[3]
    assert end["eval_loss"] == pytest.approx(evals[3], rel=1e-5)  # the best weights were restored
    assert score_export(run_dir / "export", cfg) == pytest.approx(evals[3], rel=1e-4)


def test_classification_head_learns_and_exports_with_its_labels(gang: dict[str, Any]) -> None:
    cfg, records, run_dir = gang["classify"]
    end = _event(records, "end")
    assert end["eval_accuracy"] >= 0.9
    assert end["eval_macro_f1"] >= 0.9 and sum(map(sum, end["eval_confusion"])) == 48
    # the driver's summary: the matrix as a PNG beside the run's metrics
    assert end["labels"] == ["neg", "pos"]
    assert (run_dir / "confusion_eval.png").read_bytes().startswith(b"\x89PNG")
    export_dir = run_dir / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export_dir)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        logits = model(
            **tok(
                ["the film was superb and lovely", "the film was grim and awful"],
                return_tensors="pt",
                padding=True,
            )
        ).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["pos", "neg"]


def test_mlflow_tracks_the_run_from_its_rank0_worker(gang: dict[str, Any]) -> None:
    mlflow = pytest.importorskip("mlflow", reason="run.loggers=[mlflow] needs mlflow-skinny")
    cfg, records, run_dir = gang["classify"]
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == cfg.run.project]
    (tracked,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'classify'")
    assert json.loads(tracked.data.params["train.max_steps"]) == 40
    logged = {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(logged)
    end = _event(records, "end")
    final = client.get_metric_history(tracked.info.run_id, "eval_macro_f1")[-1]
    assert final.step == 40 and final.value == pytest.approx(end["eval_macro_f1"])
    exported = {a.path for a in client.list_artifacts(tracked.info.run_id, "export")}
    assert "export/config.json" in exported and "export/labels.json" in exported


def test_lora_merged_export_matches_the_adapter(gang: dict[str, Any], tmp_path: Path) -> None:
    cfg, records, run_dir = gang["matrix-lora-3"]
    merged_dir = tmp_path / "merged-only"
    shutil.copytree(run_dir / "export" / "merged", merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    assert score_export(merged_dir, cfg) == pytest.approx(
        _event(records, "end")["eval_loss"], rel=1e-4
    )


def test_offload_bf16_lora(gang: dict[str, Any]) -> None:
    cfg, records, run_dir = gang["offload-bf16-lora"]
    end = _event(records, "end")
    assert _event(records, "start")["world_size"] == 2
    assert _event(records, "baseline")["eval_loss"] - end["eval_loss"] > 0.3
    # bf16 weights: the export scores within bf16 rounding of the last eval
    assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=2e-2)


# --------------------------------------------------------------------------- progressive
def _trainable_by_phase(records: list[dict[str, Any]]) -> list[tuple[int, int, set[str]]]:
    starts = [r for r in records if r.get("event") in ("start", "phase")]
    return [(r["step"], r["trainable_params"], set(r["lr"])) for r in starts]


@pytest.mark.parametrize("variant", list(PROGRESSIVE))
def test_progressive_unfreezing_phases_under_zero(gang: dict[str, Any], variant: str) -> None:
    cfg, records, run_dir = gang[f"progressive-{variant}"]
    phases = _trainable_by_phase(records)
    assert [step for step, _, _ in phases] == [0, 4, 8]
    counts = [n for _, n, _ in phases]
    assert counts[0] < counts[1] < counts[2], f"the trainable set did not grow: {counts}"
    groups = [g for _, _, g in phases]
    if "lora" in variant:  # adapters in the top 3 blocks, unfrozen top down; no new head
        assert groups == [{"block.3"}, {"block.2", "block.3"}, {"block.1", "block.2", "block.3"}]
    else:  # the head alone, then the top block (+ final norm), then two blocks
        assert groups == [
            {"head"},
            {"head", "other", "block.3"},
            {"head", "other", "block.2", "block.3"},
        ]
        # tiny_llama unties nothing: lm_head (4,160 x 64 = 16,640) is the head
        assert counts[0] == 16_640
    for r in records:
        if r.get("event") == "phase":
            # the previous phase's engine was torn down and its memory freed
            assert r["freed_bytes"] > 0 and r["optimizer"] == "reset"
    losses = _losses(records)
    assert sum(losses[i] for i in (10, 11, 12)) / 3 < losses[1] - 0.3, "train loss did not fall"
    end = _event(records, "end")
    assert _event(records, "baseline")["eval_loss"] - end["eval_loss"] > 0.3
    assert end["phase"] == 2
    assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)


def test_l2sp_is_the_same_penalty_under_zero0_and_zero3(gang: dict[str, Any]) -> None:
    """The term is exact under ZeRO-3 (weights and reference gathered in the owning
    module's forward): the same run under ZeRO-0 and ZeRO-3 logs the same penalty."""
    runs = {stage: gang[f"matrix-freeze_depth+lr_ratio-{stage}"][1] for stage in (0, 3)}
    values = {
        stage: {r["step"]: r["l2sp"] for r in recs if "l2sp" in r} for stage, recs in runs.items()
    }
    assert values[0][1] == 0.0  # step 1's forward runs on the pretrained weights
    assert values[0][12] > 0.1  # the trained blocks moved away from them
    for step in values[0]:
        assert values[3][step] == pytest.approx(values[0][step], rel=1e-3, abs=1e-6), step
    for recs in runs.values():
        assert _event(recs, "baseline")["eval_loss"] - _event(recs, "end")["eval_loss"] > 0.3


def test_ewc_is_the_same_penalty_under_zero0_and_zero3_and_the_probe_measures_forgetting(
    gang: dict[str, Any],
) -> None:
    from safetensors.torch import load_file

    runs = {stage: gang[f"matrix-freeze_depth+lr_ratio-{stage}"] for stage in (0, 3)}
    values = {
        stage: {r["step"]: r["ewc"] for r in recs if "ewc" in r}
        for stage, (_, recs, _) in runs.items()
    }
    assert values[0][1] == 0.0 and values[0][12] > 0  # 0 at the start, then it grows
    for step in values[0]:  # the Fisher and references are partitioned under ZeRO-3
        assert values[3][step] == pytest.approx(values[0][step], rel=1e-3, abs=1e-9), step
    fishers = [load_file(run_dir / "ewc_fisher.safetensors") for _, _, run_dir in runs.values()]
    assert fishers[0].keys() == fishers[1].keys() and len(fishers[0]) > 0
    for name, f in fishers[0].items():  # estimated before DeepSpeed: the same under both
        assert torch.allclose(f, fishers[1][name], rtol=1e-5), name
    for _, records, _ in runs.values():
        before, end = _event(records, "source_before"), _event(records, "end")
        assert end["source_loss_before"] == before["source_loss"]
        assert end["forgotten_loss"] == pytest.approx(end["source_loss"] - before["source_loss"])
        assert end["forgotten"] == pytest.approx(before["source_accuracy"] - end["source_accuracy"])
    ends = [_event(recs, "end") for _, recs, _ in runs.values()]
    assert ends[1]["forgotten_loss"] == pytest.approx(ends[0]["forgotten_loss"], rel=1e-3)


def test_l2sp_pulls_towards_the_pretrained_weights(gang: dict[str, Any]) -> None:
    """The same run with the term at weight 1 and at weight 0 (logged, no effect): the
    penalised weights end closer to the pretrained ones."""
    distance = {
        name: [r["l2sp"] for r in gang[name][1] if "l2sp" in r][-1]
        for name in ("l2sp-strong", "matrix-freeze_depth+lr_ratio-2")
    }
    assert distance["l2sp-strong"] < 0.5 * distance["matrix-freeze_depth+lr_ratio-2"], distance


def test_test_split_is_reported_only_and_l2sp_with_progressive(
    gang: dict[str, Any],
) -> None:
    cfg, records, run_dir = gang["l2sp-progressive-classify"]
    end = _event(records, "end")
    # 240 examples: 48 test, then 38 eval of the remaining 192
    assert sum(map(sum, end["test_confusion"])) == 48
    assert sum(map(sum, end["eval_confusion"])) == 38
    assert {"test_loss", "test_accuracy", "test_macro_f1"} <= set(end)
    assert not any(k.startswith("test_") for r in records if r is not end for k in r)
    # The reported numbers are the test split's, scored with the final weights: the
    # export, loaded in plain transformers, gives the same loss on those examples.
    matrix = end["test_confusion"]
    assert end["test_accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(2)) / 48)
    assert score_export(run_dir / "export", cfg, split="test") == pytest.approx(
        end["test_loss"], rel=1e-4
    )
    l2sp = {r["step"]: r["l2sp"] for r in records if "l2sp" in r}
    assert all(v == 0.0 for s, v in l2sp.items() if s <= 10)  # phase 0 trains the head only
    assert l2sp[40] > 0
    dataset = data_lib.load(cfg.data)
    assert len(dataset.test) == 48 and len(dataset.train) + len(dataset.eval) == 192


# --------------------------------------------------------------------------- DANN
def test_dann_trains_a_domain_classifier_the_same_under_zero2_and_zero3(
    gang: dict[str, Any],
) -> None:
    from jobs.objectives.dann import ganin_lambda

    logged = {}
    for stage in (2, 3):
        cfg, records, run_dir = gang[f"dann-zero{stage}"]
        steps = [r for r in records if "loss" in r and "event" not in r]
        assert [r["step"] for r in steps] == list(range(1, 21))
        for r in steps:  # one micro step per step: progress = (step - 1) / 20
            assert r["dann_lambda"] == pytest.approx(ganin_lambda((r["step"] - 1) / 20), abs=1e-6)
            assert 0.0 <= r["dann_domain_accuracy"] <= 1.0 and r["dann"] > 0
        logged[stage] = {r["step"]: r["dann"] for r in steps}
        end = _event(records, "end")
        assert _event(records, "baseline")["eval_loss"] - end["eval_loss"] > 0.01
        # the labelled target file, scored at every evaluation and at the end
        evals = [r for r in records if "eval_loss" in r]
        assert evals and all(0.0 <= r["target_eval_accuracy"] <= 1.0 for r in evals)
        assert end["target_eval_loss"] > 0
        # The domain classifier is not part of the export, which scores what training ended on.
        assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
    # The classifier is partitioned with the model under ZeRO-3: the same term, step by step.
    for step, value in logged[2].items():
        assert logged[3][step] == pytest.approx(value, rel=1e-3), step


# --------------------------------------------------------------------------- distillation
def test_distillation_follows_the_teacher_the_same_under_zero2_and_zero3(
    gang: dict[str, Any],
) -> None:
    logged = {}
    for stage in (2, 3):
        cfg, records, run_dir = gang[f"distill-zero{stage}"]
        steps = [r for r in records if "loss" in r and "event" not in r]
        assert [r["step"] for r in steps] == list(range(1, 41))
        for r in steps:  # the logged term is T^2 x the KL
            assert (
                r["distill"] == pytest.approx(4.0 * r["distill_kl"], rel=1e-4) and r["distill"] > 0
            )
        first, last = (sum(r["distill"] for r in part) / 5 for part in (steps[:5], steps[-5:]))
        assert last < 0.7 * first  # the student comes closer to the teacher
        logged[stage] = {r["step"]: r["distill"] for r in steps}
        end, baseline = _event(records, "end"), _event(records, "baseline")
        assert end["eval_loss"] < baseline["eval_loss"]
        assert end["eval_accuracy"] > baseline["eval_accuracy"] + 0.15
        # The export is the student alone (4 blocks, not the teacher's 2) and scores as trained.
        exported = json.loads((run_dir / "export" / "config.json").read_text())
        assert exported["num_hidden_layers"] == 4
        assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
    # The teacher is partitioned with the student under ZeRO-3: the same term, step by step.
    for step, value in logged[2].items():
        assert logged[3][step] == pytest.approx(value, rel=1e-3), step


# --------------------------------------------------------------------------- multi-task
def test_multitask_heads_learn_their_tasks_the_same_under_zero2_and_zero3(
    gang: dict[str, Any],
) -> None:
    logged = {}
    for stage in (2, 3):
        cfg, records, run_dir = gang[f"multitask-zero{stage}"]
        evals = [r for r in records if "eval_loss" in r]
        for r in evals:  # each task's own metrics at every evaluation, and their mean
            assert {"eval_accuracy/color", "eval_loss/color", "eval_accuracy/mean"} <= set(r)
            assert r["eval_accuracy/mean"] == pytest.approx(
                (r["eval_accuracy"] + r["eval_accuracy/color"]) / 2
            )
        baseline, end = _event(records, "baseline"), _event(records, "end")
        assert end["eval_loss/color"] < baseline["eval_loss/color"] - 0.05  # its head learns
        assert end["eval_loss"] < baseline["eval_loss"]  # and the run's own task too
        logged[stage] = {r["step"]: r["loss"] for r in records if "loss" in r}
        # The export: the run's model, and a plain transformers model per extra task that
        # scores the task's held-out part as training ended.
        assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
        assert _score_task_export(run_dir, cfg, "color") == pytest.approx(
            end["eval_loss/color"], rel=1e-3
        )
    # The shared backbone is partitioned once under ZeRO-3: the same losses step by step.
    for step, value in logged[2].items():
        assert logged[3][step] == pytest.approx(value, rel=1e-3), step


def test_multitask_heads_over_lora_share_the_adapters_and_export_merged(
    gang: dict[str, Any],
) -> None:
    cfg, records, run_dir = gang["multitask-lora"]
    baseline, end = _event(records, "baseline"), _event(records, "end")
    # (the head learns through the shared adapters; the run's own task barely moves in 20
    # steps of LoRA on a random tiny BERT, which the matrix runs cover)
    assert end["eval_loss/color"] < baseline["eval_loss/color"] - 0.1
    # the run's export is its adapter; the task's is a plain model, LoRA merged in
    assert (run_dir / "export" / "adapter").is_dir()
    assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
    assert _score_task_export(run_dir, cfg, "color") == pytest.approx(
        end["eval_loss/color"], rel=1e-3
    )


def test_multitask_lm_and_dann_heads_carry_over_progressive_phases_under_zero3(
    gang: dict[str, Any],
) -> None:
    cfg, records, run_dir = gang["multitask-progressive-lm"]
    assert [step for step, _, _ in _trainable_by_phase(records)] == [0, 6, 12]
    baseline, end = _event(records, "baseline"), _event(records, "end")
    assert end["phase"] == 2
    assert end["eval_loss/prose"] < baseline["eval_loss/prose"] - 1.0  # the LM task's head
    assert end["eval_loss"] < baseline["eval_loss"] - 1.0  # and the run's own
    for key in ("eval_perplexity/prose", "eval_accuracy/color", "eval_macro_f1/color"):
        assert key in end, key
    # An unfreeze does not reset a term's module: the domain classifier, which separates
    # the domains within phase 0, still does at the first step of phase 1 (a new one
    # would start at ~log 2).
    dann = {r["step"]: r["dann"] for r in records if "dann" in r and "event" not in r}
    assert dann[6] < 0.25 * dann[1] and dann[7] < 0.25 * dann[1], dann
    assert score_export(run_dir / "export", cfg) == pytest.approx(end["eval_loss"], rel=1e-4)
    assert _score_task_export(run_dir, cfg, "prose") == pytest.approx(
        end["eval_loss/prose"], rel=1e-3
    )


def _score_task_export(run_dir: Path, cfg: FinetuneConfig, task: str) -> float:
    """A multi-task export's task model, loaded with plain transformers, on the task's
    held-out part."""
    from jobs.objectives import multitask

    term = next(t for t in cfg.objectives if t.name == "multitask")
    spec = multitask.specs(term.args)[task]
    where = run_dir / "export" / "tasks" / task
    labels = None
    if spec.head == "classification":
        model: Any = AutoModelForSequenceClassification.from_pretrained(where)
        labels = json.loads((where / "labels.json").read_text())
    else:
        model = AutoModelForCausalLM.from_pretrained(where)
    tokenizer = AutoTokenizer.from_pretrained(where)
    _, held_out, _ = multitask.read_task(spec, cfg.data, key="k", eval_fraction=0.2)
    encoded = spec.kind.encode(held_out, tokenizer, spec.data(cfg.data), labels)
    batches = data_lib.eval_batches(
        encoded,
        rank=0,
        world_size=1,
        micro_batch_size=8,
        pad_id=tokenizer.pad_token_id,
        collate_fn=spec.kind.collate,
    )
    return evaluate(model.eval(), batches, task=spec.kind)["eval_loss"]
