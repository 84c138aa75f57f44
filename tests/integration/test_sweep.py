"""`graft sweep` on a real local Ray: Optuna studies in real SQLite and PostgreSQL, ASHA
pruning, Ray Train gangs of DeepSpeed workers inside Tune trials, a killed driver.

    pytest tests/integration/test_sweep.py

The first two tests run real trials (Train gangs of DeepSpeed workers); the driver-kill
and two-driver tests run the same sweep driver, Tune and Optuna storage with scripted
learning curves (tests/integration/scripted.py): what they check is the searcher's
bookkeeping, not training, and a scripted trial takes ~3 s instead of 20-30 s.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from cluster.cli import app
from jobs import runlog
from jobs import space as space_lib
from jobs import study as study_lib
from jobs.config import compose
from jobs.finetune import config_digest
from jobs.finetune import run as finetune
from jobs.sweep import check, concurrency
from jobs.sweep import run as sweep
from tests.conftest import tiny_overrides
from tests.integration import scripted

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_2cpus")]
optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).parents[2]


def _overrides(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Tiny LLaMA on the instruction set: 12 steps, an evaluation (and checkpoint) every 4."""
    return tiny_overrides(data_dir) + [
        "scaling.num_workers=1",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.log_every=4",
        f"run.output_dir={out}",
        "sweep.space.lr.low=1e-3",
        "sweep.space.lr.high=3e-2",
        "sweep.space.lr_light.low=1e-3",
        "sweep.space.lr_light.high=3e-2",
        "sweep.enqueue=[]",  # the shipped starting points are real-weights lrs
        "sweep.baseline=none",
        "sweep.objectives=[{metric:eval_loss,mode:min}]",
        *extra,
    ]


def _trials(summary_dir: Path, storage: str | None = None) -> Any:
    meta = json.loads((summary_dir / "sweep.json").read_text())
    return optuna.load_study(study_name=meta["study"], storage=storage or meta["storage"])


def test_sweep_prunes_persists_reports_and_the_best_config_reruns(
    data_dir: Path, tmp_path: Path
) -> None:
    good = "{strategy:full,lr:0.01,lr_ratio:1.0}"
    also_good = "{strategy:freeze_depth,freeze_depth:4,lr:0.01,lr_ratio:0.8}"
    bad = "{strategy:feature_extraction,lr_light:0.001}"  # a frozen random backbone barely learns
    cfg = compose(
        _overrides(
            data_dir,
            tmp_path,
            "sweep.num_trials=6",
            "sweep.max_concurrent=2",
            "sweep.scheduler=asha",  # every trial against all (the stratified rule: below)
            "sweep.grace_period=1",
            "sweep.reduction_factor=2",
            f"sweep.enqueue=[{good},{also_good},{bad}]",
            "sweep.baseline=scratch",
        ),
        config_name="sweep",
    )
    result = sweep(cfg, show_progress=False)
    study = _trials(result.sweep_dir)
    trials = study.get_trials()

    # Every trial is in the study file with its params and intermediate values.
    assert len(trials) == 6 and {t.state for t in trials} <= {
        TrialState.COMPLETE,
        TrialState.PRUNED,
    }
    assert all(t.params and t.intermediate_values for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "ASHA pruned nothing"
    assert trials[2].state == TrialState.PRUNED  # the bad point, behind two good ones at rung 1
    for t in pruned:  # stopped before its last (3rd) evaluation
        assert max(t.intermediate_values) < 3 and t.user_attrs["stopped_at_eval"] < 3
    # Optuna's own CLI reads the study.
    listed = subprocess.run(
        [
            str(Path(sys.executable).parent / "optuna"),
            "trials",
            "--study-name",
            study.study_name,
            "--storage",
            result.storage,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(listed.stdout)
    assert len(rows) == 6 and all({"lr", "lr_light"} & set(r["params"]) for r in rows)

    # Two 1-worker trials ran side by side on the 2-CPU cluster (no nested deadlock):
    # the searcher handed out trial 1 before trial 0 finished. (Their training spans are
    # only seconds long here, so comparing those would depend on start-up jitter.)
    a, b = trials[0], trials[1]
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete, (
        "trials 0 and 1 did not overlap"
    )

    # Baseline and summary.
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    best = study.best_trial
    assert summary["best"]["number"] == best.number
    # Scratch searched its own lr (the best trial's x 1, 3, 10, and up to 2 more past the
    # end where its best was) at the same budget; the gain is against the best of those,
    # and the per-example sums of the two runs reproduce it exactly (the bootstrap's basis).
    search = summary["baselines_search"]["scratch"]
    best_lr = best.params.get("lr", best.params.get("lr_light"))  # one lr range per strategy kind
    lrs, grid = [r["lr"] for r in search], [best_lr * m for m in (1, 3, 10)]
    assert lrs == sorted(lrs) and [lr for lr in lrs if grid[0] <= lr <= grid[-1]] == pytest.approx(
        grid
    )
    extra = [lr for lr in lrs if not grid[0] <= lr <= grid[-1]]
    assert len(extra) <= 2
    chosen = min(search, key=lambda r: r["eval_loss"])
    ran = list((result.sweep_dir / "baselines" / "scratch").iterdir())
    if len(extra) < 2 and len(ran) == len(search):  # none diverged: it went on until
        assert lrs[0] < chosen["lr"] < lrs[-1]  # its best was inside the range
    scratch = runlog.read(Path(chosen["run_dir"]))
    assert scratch[-1]["event"] == "end" and scratch[-1]["step"] == 12
    assert summary["baselines_lr"]["scratch"] == chosen["lr"]
    assert summary["transfer_gain"] == pytest.approx(scratch[-1]["eval_loss"] - best.value)
    held_out = summary["transfer_gain_held_out"]
    assert held_out["split"] == "eval" and held_out["gain"] == pytest.approx(
        summary["transfer_gain"], rel=1e-6
    )
    low, high = held_out["ci95"]
    assert low <= held_out["gain"] <= high

    # Report: files, plots, the best trial named.
    report = result.report_dir
    assert report is not None
    md = (report / "report.md").read_text()
    assert f"Best trial: {best.number}" in md and "baseline scratch" in md
    assert f"Best trial: {best.number}" in (report / "report.html").read_text()
    for name in ("history", "curves", "slices", "baselines"):
        assert (report / f"{name}.png").read_bytes().startswith(PNG), name
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 3:
        assert (report / "importances.png").read_bytes().startswith(PNG)
    else:  # said, not silently left out
        assert "Parameter importances: need at least 3 complete trials" in md
    runner = CliRunner().invoke(app, ["report", str(result.sweep_dir)])
    assert runner.exit_code == 0 and "best.yaml" in runner.output

    # The best config, as a Hydra experiment file, reruns to the same metric.
    rerun_cfg = compose(
        [
            f"+experiment={report / 'best.yaml'}",
            "cluster.num_cpus=2",
            f"run.output_dir={tmp_path / 'rerun'}",
        ]
    )
    rerun = finetune(rerun_cfg, show_progress=False)
    assert rerun.metrics["eval_loss"] == pytest.approx(best.value, rel=1e-3)


def test_two_worker_trials_multi_objective(data_dir: Path, tmp_path: Path) -> None:
    cfg = compose(
        _overrides(
            data_dir,
            tmp_path,
            "scaling.num_workers=2",
            "sweep.num_trials=1",
            "sweep.max_concurrent=2",
            "sweep.scheduler=none",
            "sweep.max_t=2",  # trials train 8 of the 12 steps; the best is retrained at 12
            "sweep.objectives=[{metric:eval_loss,mode:min},{metric:trainable_params,mode:min}]",
        ),
        config_name="sweep",
    )
    assert concurrency(cfg) == (1, 1)  # one 2-worker gang fits on 2 CPUs at a time
    result = sweep(cfg, show_progress=False)
    study = _trials(result.sweep_dir)
    space, _ = check(cfg)
    for t in study.get_trials():
        assert t.state == TrialState.COMPLETE and len(t.values) == 2
        start = next(
            r for r in runlog.read(Path(t.user_attrs["run_dir"])) if r.get("event") == "start"
        )
        assert start["world_size"] == 2
        assert t.values[1] == start["trainable_params"]
        # Both ranks trained the config the trial's params describe (checked across ranks).
        expected = space_lib.apply(space_lib.trial_base(cfg), space, t.params)
        expected.run.name = str(t.number)
        assert start["config_digest"] == config_digest(expected)
    # The best trial retrained at the full budget, on the same 2-worker gang; the best
    # config file is that run's.
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    assert summary["retrained"]["step"] == 12 and study.get_trials()[0].user_attrs["step"] == 8
    end = runlog.read(result.sweep_dir / "best")[-1]
    assert end["event"] == "end" and summary["retrained"]["eval_loss"] == end["eval_loss"]
    assert result.report_dir is not None
    assert "max_steps: 12" in (result.report_dir / "best.yaml").read_text()
    assert "best retrained at the full 12 steps" in (result.report_dir / "report.md").read_text()
    # (a many-trial front is drawn in tests/unit/test_sweep.py)
    assert (result.report_dir / "pareto.png").read_bytes().startswith(PNG)
    assert "0 (Pareto)" in (result.report_dir / "report.md").read_text()


def _states(db: Path) -> list[tuple[int, str]]:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    except sqlite3.Error:
        return []


def test_resume_after_the_driver_is_killed(data_dir: Path, tmp_path: Path) -> None:
    import ray

    overrides = _overrides(
        data_dir,
        tmp_path,
        "sweep.num_trials=4",
        "sweep.max_concurrent=2",
        "sweep.scheduler=none",
        "run.name=resume",
        f"cluster.address={ray.get_runtime_context().gcs_address}",
    )
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.scripted", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sweep_dir = tmp_path / "resume"
    deadline, killed_running = time.time() + 300, []
    while time.time() < deadline and driver.poll() is None:
        states = _states(sweep_dir / "study.db")
        finished = [n for n, s in states if s in ("COMPLETE", "PRUNED")]
        running = [n for n, s in states if s == "RUNNING"]
        checkpointed = [
            n
            for n in running
            if glob.glob(
                str(sweep_dir / "trials" / str(n) / "checkpoints" / "step_*" / "COMMITTED.*")
            )
        ]
        if finished and checkpointed:
            killed_running = running
            break
        time.sleep(0.1)
    assert killed_running, (
        f"the driver never had a finished and a checkpointed trial: {_states(sweep_dir / 'study.db')}"
    )
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {
        t.number: t for t in _trials(sweep_dir).get_trials() if t.state == TrialState.COMPLETE
    }

    # the same command
    result = sweep(
        compose(overrides, config_name="sweep"), show_progress=False, trial=scripted.trial
    )
    trials = _trials(result.sweep_dir).get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    counted = [t for t in trials if t.state != TrialState.FAIL]
    assert len(counted) == 4  # the budget, no more, no less
    for number, t in before.items():  # finished trials were kept and not run again
        assert trials[number].state == TrialState.COMPLETE
        assert trials[number].datetime_complete == t.datetime_complete
        starts = [
            r for r in runlog.read(Path(t.user_attrs["run_dir"])) if r.get("event") == "start"
        ]
        assert len(starts) == 1
    retries = [t for t in trials if t.system_attrs.get("retry_history")]
    assert {t.system_attrs["retry_history"][0] for t in retries} == set(killed_running)
    for t in retries:  # a retry trains in its original's run directory, from its checkpoint
        original = t.system_attrs["retry_history"][0]
        assert t.user_attrs["run_dir"] == str(sweep_dir / "trials" / str(original))
        assert trials[original].state == TrialState.FAIL
    resumed = [
        t
        for t in retries
        if "resume" in {r.get("event") for r in runlog.read(Path(t.user_attrs["run_dir"]))}
    ]
    assert resumed, "no re-queued trial resumed from its checkpoint"


def _postgres_or_skip() -> None:
    try:
        import psycopg2

        psycopg2.connect(
            host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3
        ).close()
    except Exception as e:
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432 (database test): {e}")


def test_two_drivers_share_a_postgresql_study(data_dir: Path, tmp_path: Path) -> None:
    import ray

    _postgres_or_skip()
    name = f"graft-test-{uuid.uuid4().hex[:8]}"
    overrides = _overrides(
        data_dir,
        tmp_path,
        "sweep.num_trials=4",
        "sweep.max_concurrent=1",
        "sweep.scheduler=none",
        f"sweep.storage={POSTGRES}",
        f"sweep.study={name}",
        f"cluster.address={ray.get_runtime_context().gcs_address}",
    )
    env = dict(os.environ)
    drivers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.scripted", *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [d.communicate(timeout=420)[0] for d in drivers]
        assert [d.returncode for d in drivers] == [0, 0], outputs
        study = optuna.load_study(study_name=name, storage=study_lib.open_storage(POSTGRES))
        trials = study.get_trials()
        numbers = [t.number for t in trials]
        assert numbers == list(range(len(trials))) and len(set(numbers)) == len(numbers)
        counted = [t for t in trials if not t.user_attrs.get("over_budget")]
        assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
        assert len({t.user_attrs["driver"] for t in counted}) == 2, "one driver did all the work"
        assert all(t.params and t.intermediate_values for t in counted)
        # The report reads the study back from PostgreSQL.
        sweep_dir = next(tmp_path.glob("sweep-*"))
        md = CliRunner().invoke(app, ["report", str(sweep_dir)])
        assert md.exit_code == 0, md.output
        assert (
            f"Best trial: {study.best_trial.number}"
            in (sweep_dir / "report" / "report.md").read_text()
        )
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
        try:
            optuna.delete_study(study_name=name, storage=study_lib.open_storage(POSTGRES))
        except KeyError:
            pass


def test_asha_on_scripted_curves_prunes_the_worse_and_keeps_the_budget(
    data_dir: Path, tmp_path: Path
) -> None:
    """The searcher, ASHA and the budget in seconds: scripted curves whose order is
    known (nearer lr=1e-2 is better at every evaluation)."""
    lrs = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5]
    cfg = compose(
        _overrides(
            data_dir,
            tmp_path,
            "sweep.num_trials=6",
            "sweep.max_concurrent=2",
            "sweep.grace_period=1",
            "sweep.reduction_factor=2",
            "sweep.space.lr.low=1e-5",
            "sweep.space.lr.high=3e-2",
            "sweep.enqueue=["
            + ",".join(f"{{strategy:full,lr:{lr},lr_ratio:1.0}}" for lr in lrs)
            + "]",
        ),
        config_name="sweep",
    )
    result = sweep(cfg, show_progress=False, report=False, trial=scripted.trial)
    trials = _trials(result.sweep_dir).get_trials()
    assert len(trials) == 6 and [t.params["lr"] for t in trials] == lrs
    assert trials[0].state == TrialState.COMPLETE and result.best is not None
    assert result.best["number"] == 0  # the best curve won
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    assert pruned and 0 not in pruned
    # a pruned trial stopped at a rung, behind a better one that had reached it
    for t in trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["stopped_at_eval"] < 3
            assert t.intermediate_values[1] == pytest.approx(scripted.curve(t.params["lr"], 1))


def _slow_starter_sweep(data_dir: Path, tmp_path: Path, *extra: str) -> Any:
    """Two full-fine-tuning trials, then two LoRA trials that start behind and end
    ahead (scripted.curve), one at a time."""
    points = [("full", 1e-2), ("full", 3e-3), ("lora", 1e-2), ("lora", 3e-3)]
    cfg = compose(
        _overrides(
            data_dir,
            tmp_path,
            "sweep.num_trials=4",
            "sweep.max_concurrent=1",
            "sweep.grace_period=1",
            "sweep.reduction_factor=2",
            "sweep.enqueue=["
            + ",".join(
                f"{{strategy:{s},{'lr_light' if s == 'lora' else 'lr'}:{lr},lr_ratio:1.0}}"
                for s, lr in points
            )
            + "]",
            *extra,
        ),
        config_name="sweep",
    )
    result = sweep(cfg, show_progress=False, trial=scripted.trial)
    return result, _trials(result.sweep_dir).get_trials()


def test_stratified_halving_keeps_the_slow_starter_that_wins(
    data_dir: Path, tmp_path: Path
) -> None:
    result, trials = _slow_starter_sweep(data_dir, tmp_path / "stratified")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert result.best is not None and trials[result.best["number"]].params["strategy"] == "lora"
    assert result.best["values"][0] == pytest.approx(scripted.curve(1e-2, 3, "lora"))
    # The report says how many trials of each strategy reached each rung.
    md = (result.report_dir / "report.md").read_text()
    assert "## Rungs" in md and "| full | 2 | 2 | 2 |" in md and "| lora | 2 | 2 | 2 |" in md


def test_plain_asha_prunes_the_slow_starter_and_the_budget_caps_the_steps(
    data_dir: Path, tmp_path: Path
) -> None:
    """Ray's ASHA compares every trial with all at the first rung: it prunes the second
    full trial behind the first and both LoRA trials (the winner is lost), leaving one
    complete trial, which the summary warns about. sweep.budget=30 steps: a trial
    starts only when the steps left cover it in full, so after 12 + 4 + 4 steps the
    fourth (20 + 12 > 30) never starts."""
    result, trials = _slow_starter_sweep(
        data_dir, tmp_path / "asha", "sweep.scheduler=asha", "sweep.budget=30"
    )
    complete, pruned, waiting = TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING
    assert [t.state for t in trials] == [complete, pruned, pruned, waiting]  # 4th left queued
    assert [t.user_attrs["stopped_at_eval"] for t in trials[1:3]] == [1, 1]
    assert result.best is not None and result.best["number"] == 0  # a full trial
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    assert summary["compute"]["trial_steps"] == 12 + 4 + 4 <= 30
    assert summary["compute"]["trial_full_runs"] == pytest.approx(20 / 12)
    assert "only 1 trial(s) completed" in summary["warning"]
    md = (result.report_dir / "report.md").read_text()
    assert "compute: trials 20 steps" in md and "too few for the ranking" in md
