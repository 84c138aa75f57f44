"""The command line end to end, as a user runs it: `graft finetune` (embedded Ray and
an existing cluster by address) and `python -m jobs.finetune`. The error cases run the
same Typer app in-process (CliRunner): each would otherwise pay ~8 s of imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from jobs import runlog
from jobs.config import compose
from tests.conftest import tiny_overrides

ROOT = Path(__file__).parents[2]
GRAFT = [sys.executable, "-m", "cluster.cli"]


def _cli(*args: str) -> Any:
    """`graft ARGS` in this process: exit code, stdout and stderr apart."""
    return CliRunner().invoke(app, list(args))


def _graft(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GRAFT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.mark.integration
def test_the_demo_runs_from_the_cli_and_transfers(tmp_path: Path) -> None:
    """`make demo` is `graft finetune` with no overrides; here with fewer steps."""
    result = _graft(
        "finetune",
        "-q",
        "train.max_steps=20",
        "train.eval_every=20",
        "train.checkpoint_every=20",
        "train.warmup_steps=2",
        f"run.output_dir={tmp_path}",
        "run.name=demo",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "graft: done" in result.stdout
    records = runlog.read(tmp_path / "demo")
    baseline = next(r for r in records if r.get("event") == "baseline")
    end = next(r for r in records if r.get("event") == "end")
    # 8 classes (chance 0.125): pretrained MiniLM learns fast.
    assert end["eval_accuracy"] > 0.4 and end["eval_accuracy"] > baseline["eval_accuracy"] + 0.2
    assert (tmp_path / "demo" / "export" / "model.safetensors").is_file()


@pytest.mark.integration
def test_finetune_on_an_existing_cluster_by_address(
    tmp_path: Path, data_dir: Path, ray_2cpus: None
) -> None:
    import ray

    from tests.integration.test_finetune import score_export

    address = ray.get_runtime_context().gcs_address
    # One worker, ZeRO-1, freeze_depth: also the single-worker case of the finetune tests.
    overrides = [
        *tiny_overrides(data_dir),
        "deepspeed=zero1",
        "scaling=single",
        "strategy=freeze_depth",
    ]
    result = _graft(
        "finetune",
        "-q",
        *overrides,
        "cluster=remote",
        f"cluster.address={address}",
        f"run.output_dir={tmp_path}",
        "run.name=remote",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Ray at {address}" in result.stdout
    records = runlog.read(tmp_path / "remote")
    end = next(r for r in records if r.get("event") == "end")
    assert end["step"] == 12
    assert next(r for r in records if r.get("event") == "start")["world_size"] == 1
    assert (
        next(r for r in records if r.get("event") == "baseline")["eval_loss"] - end["eval_loss"]
        > 0.3
    )
    cfg = compose(overrides)
    assert score_export(tmp_path / "remote" / "export", cfg) == pytest.approx(
        end["eval_loss"], rel=1e-4
    )


def test_an_unreachable_cluster_address_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    result = _cli(
        "finetune",
        *tiny_overrides(data_dir),
        "cluster=remote",
        "cluster.address=127.0.0.1:1",
        f"run.output_dir={tmp_path}",
    )
    assert result.exit_code == 2
    assert "cluster.address" in result.stderr and "127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_a_cluster_address_is_checked_even_beside_a_connected_session(
    tmp_path: Path, data_dir: Path, ray_2cpus: None
) -> None:
    """In a process already on Ray (a notebook, this test worker), cluster.address must
    still be honoured: nothing there is an error, another cluster too (it once trained
    on the session's cluster instead, depending on which test ran first)."""
    for address, says in (
        ("127.0.0.1:1", "nothing answers"),
        ("127.0.0.1:5432", "but it is not Ray"),  # PostgreSQL answers, Ray does not
    ):
        result = _cli(
            "finetune",
            *tiny_overrides(data_dir),
            "cluster=remote",
            f"cluster.address={address}",
            f"run.output_dir={tmp_path}",
        )
        assert result.exit_code == 2, result.stdout
        assert "cluster.address" in result.stderr and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_bad_value_is_a_clear_error_from_the_cli() -> None:
    result = _cli("finetune", "strategy=lora", "strategy.lora.r=0")
    assert (
        result.exit_code == 2
        and "strategy.lora.r" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_python_m_jobs_finetune_is_the_same_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs.finetune", "--cfg", "job", "strategy=lora"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "name: lora" in result.stdout and "name: minilm" in result.stdout


def test_too_many_workers_fail_before_the_embedded_ray_starts(
    tmp_path: Path, data_dir: Path
) -> None:
    result = _cli(
        "finetune", *tiny_overrides(data_dir), "scaling.num_workers=3", f"run.output_dir={tmp_path}"
    )
    assert result.exit_code == 2
    assert "scaling.num_workers" in result.stderr and "3 workers" in result.stderr
    assert "Ray at" not in result.stdout  # no cluster was started


def test_a_bad_search_space_fails_before_anything_is_written(
    tmp_path: Path, data_dir: Path
) -> None:
    result = _cli(
        "sweep",
        *tiny_overrides(data_dir),
        "sweep.space.lr.low=0.1",
        "sweep.space.lr.high=0.001",
        f"run.output_dir={tmp_path}",
    )
    assert result.exit_code == 2
    assert (
        "sweep.space.lr.low" in result.stderr and "low 0.1 is more than high 0.001" in result.stderr
    )
    assert "Traceback" not in result.stderr and "Ray at" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_study_database_fails_before_anything_is_written(
    tmp_path: Path, data_dir: Path
) -> None:
    result = _cli(
        "sweep",
        *tiny_overrides(data_dir),
        "sweep.storage=postgresql://nobody@127.0.0.1:1/nothing",
        f"run.output_dir={tmp_path}",
    )
    assert result.exit_code == 2
    assert "sweep.storage: cannot open postgresql" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_sweep_cfg_prints_the_space() -> None:
    result = _cli("sweep", "--cfg", "sweep.num_trials=40")
    assert result.exit_code == 0, result.stderr
    assert "num_trials: 40" in result.stdout and "lora_rank:" in result.stdout


def test_cfg_takes_hydras_job_hydra_all_and_a_bare_cfg_means_job() -> None:
    bare = _cli("finetune", "--cfg", "train.lr=0.5")  # the override stays an override
    assert bare.exit_code == 0, bare.stderr
    assert "  lr: 0.5" in bare.stdout and "hydra:" not in bare.stdout
    hydra = _cli("finetune", "strategy=lora", "--cfg", "hydra")
    assert hydra.exit_code == 0, hydra.stderr
    assert hydra.stdout.startswith("hydra:") and "name: lora" not in hydra.stdout
    assert "strategy=lora" in hydra.stdout  # the overrides Hydra recorded
    both = _cli("sweep", "--cfg=all")
    assert both.exit_code == 0, both.stderr
    assert "num_trials:" in both.stdout and "\nhydra:" in both.stdout
    last = _cli("finetune", "--cfg")
    assert last.exit_code == 0 and "model:" in last.stdout, last.stderr
    bad = _cli("finetune", "--cfg=everything")
    assert bad.exit_code == 2 and "takes job|hydra|all" in bad.stderr


def test_graft_eval_scores_with_no_training_and_refuses_a_template_without_label(
    tmp_path: Path, data_dir: Path
) -> None:
    """`graft eval zero_shot|few_shot` trains nothing and needs no Ray; model.task is
    set for classification data when not given."""
    data = ["model=tiny_bert", "data=jsonl", f"data.path={data_dir / 'cls.jsonl'}"]
    result = _cli("eval", "few_shot", *data, f"run.output_dir={tmp_path}", "eval.shots=3")
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("tiny_bert-jsonl-few_shot-")
    end = runlog.read(run_dir)[-1]
    assert end["event"] == "end" and "eval_accuracy" in end and "few_shot done" in result.stdout
    bad = _cli("eval", "zero_shot", *data, "eval.templates=['{text} means']")
    assert bad.exit_code == 2 and "eval.templates[0]" in bad.stderr
    assert "{label}" in bad.stderr and "Traceback" not in bad.stderr
    other = _cli("eval", "ten_shot", *data)
    assert other.exit_code == 2 and "zero_shot or few_shot" in other.stderr
