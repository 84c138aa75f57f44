"""The fine-tuning job on a real local Ray with real DeepSpeed over gloo, 2 workers.

    pytest tests/integration -m integration

Every run here is a complete `jobs.finetune.run`: Ray Train gang, DeepSpeed engine,
Ray Train checkpoints, Hugging Face export. The export is then loaded with plain
transformers/peft and scored again.
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
from jobs.finetune import run
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_2cpus")]


def _run(
    tmp_path: Path, overrides: list[str], name: str = "run"
) -> tuple[FinetuneConfig, list[dict[str, Any]]]:
    cfg = compose(overrides + [f"run.output_dir={tmp_path}", f"run.name={name}"])
    summary = run(cfg, show_progress=False)
    return cfg, runlog.read(summary.run_dir)


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _event(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in records if r.get("event") == name)


def score_export(export_dir: Path, cfg: FinetuneConfig) -> float:
    """Eval loss of the exported model, loaded with plain transformers / peft."""
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
    encoded = data_lib.encode(dataset.eval, tokenizer, cfg.data, labels)
    batches = data_lib.eval_batches(
        encoded, rank=0, world_size=1, micro_batch_size=8, pad_id=tokenizer.pad_token_id
    )
    model.eval()
    return evaluate(model, batches)["eval_loss"]


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=full"],
        ["strategy=freeze_depth", "strategy.num_trainable_blocks=2", "strategy.lr_ratio=0.5"],
        ["strategy=lora", "strategy.lora.r=8"],
    ],
    ids=["full", "freeze_depth+lr_ratio", "lora"],
)
def test_loss_falls_and_the_export_reproduces_the_final_eval(
    tmp_path: Path, data_dir: Path, stage: int, strategy: list[str]
) -> None:
    cfg, records = _run(tmp_path, tiny_overrides(data_dir) + strategy + [f"deepspeed=zero{stage}"])
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
    assert score_export(tmp_path / "run" / "export", cfg) == pytest.approx(
        end["eval_loss"], rel=1e-4
    )
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "extra",
    [
        ["deepspeed=zero3", "strategy=lora", "strategy.lr_ratio=0.7"],
        ["deepspeed=zero2", "strategy=freeze_depth", "strategy.lr_ratio=0.5"],
    ],
    ids=["zero3-lora", "zero2-freeze_depth"],
)
def test_a_crashed_run_resumes_from_its_last_complete_checkpoint(
    tmp_path: Path, data_dir: Path, extra: list[str]
) -> None:
    overrides = tiny_overrides(data_dir) + extra + ["train.schedule=linear", "train.warmup_steps=2"]
    _, straight = _run(tmp_path, overrides, name="straight")

    with pytest.raises(Exception, match="fail_at_step"):
        _run(tmp_path, overrides + ["train.fail_at_step=9"], name="crashy")
    _, resumed = _run(tmp_path, overrides, name="crashy")
    assert _event(resumed, "resume")["step"] == 6  # checkpoint at 6; the crash came at 9
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == sorted(a)  # the file reads as one run: no duplicate steps
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5), f"step {step}"
    lrs = {r["step"]: r["lr"] for r in resumed if "lr" in r and "loss" in r}
    assert lrs[12] == pytest.approx({r["step"]: r["lr"] for r in straight if "loss" in r}[12])
    assert _event(resumed, "end")["eval_loss"] == pytest.approx(
        _event(straight, "end")["eval_loss"], rel=1e-5
    )

    # A checkpoint missing one rank's commit marker is never loaded: back to step 6.
    latest = tmp_path / "crashy" / "checkpoints" / "step_00000012"
    (latest / "COMMITTED.rank1").unlink()
    _, again = _run(tmp_path, overrides, name="crashy")
    assert _event(again, "resume")["step"] == 6


def test_early_stopping_stops_all_workers_and_exports_the_best(
    tmp_path: Path, data_dir: Path
) -> None:
    # mode=max on a falling eval loss: the first eval is the best, the next one exhausts patience.
    cfg, records = _run(
        tmp_path,
        tiny_overrides(data_dir)
        + [
            "deepspeed=zero2",
            "train.eval_every=3",
            "train.early_stopping.enabled=true",
            "train.early_stopping.mode=max",
            "train.early_stopping.patience=1",
        ],
    )
    end = _event(records, "end")
    assert end["stopped_early"] and end["step"] == 6 and end["best_step"] == 3
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "event" not in r}
    assert evals[6] < evals[3]
    assert end["eval_loss"] == pytest.approx(evals[3], rel=1e-5)  # the best weights were restored
    assert score_export(tmp_path / "run" / "export", cfg) == pytest.approx(evals[3], rel=1e-4)


def test_classification_head_learns_and_exports_with_its_labels(
    tmp_path: Path, data_dir: Path
) -> None:
    cfg, records = _run(
        tmp_path,
        tiny_overrides(data_dir, task="classification")
        + [
            "deepspeed=zero3",
            "train.max_steps=40",
            "train.lr=1e-3",
            "train.schedule=linear",
            "data.max_length=48",
            "train.eval_every=20",
            "train.checkpoint_every=20",
        ],
    )
    assert _event(records, "end")["eval_accuracy"] >= 0.9
    export_dir = tmp_path / "run" / "export"
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


def test_lora_merged_export_matches_the_adapter(tmp_path: Path, data_dir: Path) -> None:
    cfg, records = _run(
        tmp_path,
        tiny_overrides(data_dir) + ["deepspeed=zero3", "strategy=lora", "run.export_merged=true"],
    )
    export_dir = tmp_path / "run" / "export"
    merged_dir = tmp_path / "merged-only"
    shutil.copytree(export_dir / "merged", merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    assert score_export(merged_dir, cfg) == pytest.approx(
        _event(records, "end")["eval_loss"], rel=1e-4
    )


@pytest.mark.parametrize(
    ("extra", "rel"),
    [
        (["deepspeed=zero3_offload", "deepspeed.bf16=true", "strategy=lora"], 2e-2),  # bf16 weights
        (["deepspeed=zero1", "scaling=single", "strategy=freeze_depth"], 1e-4),
    ],
    ids=["zero3-offload-bf16-lora", "zero1-1worker-freeze_depth"],
)
def test_offload_bf16_and_a_single_worker(
    tmp_path: Path, data_dir: Path, extra: list[str], rel: float
) -> None:
    cfg, records = _run(tmp_path, tiny_overrides(data_dir) + extra)
    end = _event(records, "end")
    assert _event(records, "start")["world_size"] == cfg.scaling.num_workers
    assert _event(records, "baseline")["eval_loss"] - end["eval_loss"] > 0.3
    assert score_export(tmp_path / "run" / "export", cfg) == pytest.approx(
        end["eval_loss"], rel=rel
    )
