"""The sweep's parts that need no Ray: the space (checks, sampling, applying), names,
the study bookkeeping (budget, reclaiming a dead driver's trials) on a real SQLite
Optuna study, experiment files, and the report from a real study."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conf.schema import ConfigError, FinetuneConfig, ParamSpec
from jobs import space as space_lib
from jobs import study as study_lib
from jobs.config import compose, run_name
from jobs.report import write_report
from jobs.sweep import check, summarize, sweep_name
from tests.conftest import tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(data_dir: Path, *extra: str, task: str = "classification") -> list[str]:
    return tiny_overrides(data_dir, task=task) + list(extra)


def _cfg(data_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    return compose(_sweep(data_dir, *extra), config_name="sweep")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sweep.space.lr.low=0.1", "sweep.space.lr.low"),  # low > high
        ("sweep.space.lora_rank.choices=[]", "sweep.space.lora_rank.choices"),
        ("sweep.space.lr.key=train.learning_rate", "sweep.space.lr.key"),
        ("sweep.space.lr.key=scaling.num_workers", "sweep.space.lr.key"),
        ("sweep.space.lr.key=strategy.lora", "sweep.space.lr.key"),
        ("sweep.space.lr.type=gaussian", "sweep.space.lr.type"),
        ("sweep.space.lr.low=0", "sweep.space.lr.low"),  # log_float needs low > 0
        ("sweep.space.freeze_depth.high=9", "sweep.space.freeze_depth.high"),  # > 4 blocks
        ("sweep.space.freeze_depth.low=1.5", "sweep.space.freeze_depth.low"),
        ("sweep.space.lr_ratio.high=1.5", "sweep.space.lr_ratio.low"),
        ("sweep.space.lora_rank.when={strategy:[adapters]}", "sweep.space.lora_rank.when.strategy"),
        ("+sweep.space.freeze_depth.when.lr_ratio=[0.5]", "sweep.space.freeze_depth.when"),  # later
        ("sweep.space.strategy.choices=[full,prefix_tuning]", "sweep.space.strategy.choices"),
        ("sweep.space.lora_alpha.key=strategy.lora.r", "sweep.space.lora_alpha.key"),  # twice
        ("+sweep.enqueue=[{depth:2}]", "sweep.enqueue[0].depth"),
        ("+sweep.enqueue=[{lr:5.0}]", "sweep.enqueue[0].lr"),
        # lr applies to block-training strategies only: LoRA's lr is lr_light
        ("sweep.enqueue=[{strategy:lora,lr:1e-3}]", "sweep.enqueue[0].lr"),
        # two parameters on train.lr whose conditions overlap (full)
        ("sweep.space.lr_light.when={strategy:[lora,full]}", "sweep.space.lr_light.key"),
        ("sweep.max_t=4", "sweep.max_t"),  # a trial makes only 2 evaluations
        ("sweep.stratify_by=strategyy", "sweep.stratify_by"),  # not a parameter
        ("sweep.budget=11", "sweep.budget"),  # less than one 12-step trial
    ],
)
def test_bad_spaces_are_rejected_with_the_key(data_dir: Path, override: str, key: str) -> None:
    cfg = _cfg(data_dir, override)
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert e.value.key == key, str(e.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sweep.grace_period=3", "sweep.grace_period"),  # with max_t=2
        ("sweep.reduction_factor=1", "sweep.reduction_factor"),
        ("sweep.num_trials=0", "sweep.num_trials"),
        ("sweep.scheduler=pbt", "sweep.scheduler"),
        ("sweep.sampler=grid", "sweep.sampler"),
        ("sweep.baseline=imagenet", "sweep.baseline"),
        ("sweep.objectives=[{metric:bleu,mode:max}]", "sweep.objectives[0].metric"),
        ("sweep.objectives=[{metric:trainable_params,mode:min}]", "sweep.objectives[0].metric"),
        ("sweep.objectives=[{metric:eval_loss,mode:down}]", "sweep.objectives[0].mode"),
        ("sweep.budget=0", "sweep.budget"),
        ("sweep.min_peers=-1", "sweep.min_peers"),
        ("sweep.scratch_lr_mults=[]", "sweep.scratch_lr_mults"),
        ("sweep.probe_lr_mults=[1,-3]", "sweep.probe_lr_mults"),
        ("sweep.baseline_lr_extend=-1", "sweep.baseline_lr_extend"),
        ("sweep.weak_transfer_margin=-0.1", "sweep.weak_transfer_margin"),
    ],
)
def test_bad_sweep_settings_are_rejected_when_composed(
    data_dir: Path, override: str, key: str
) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(data_dir, "sweep.max_t=2", override)
    assert e.value.key == key


def test_an_empty_space_is_rejected(data_dir: Path) -> None:
    sweep = _cfg(data_dir).sweep
    assert sweep is not None
    with pytest.raises(ConfigError, match="sweep.space: is empty"):
        dataclasses.replace(sweep, space={}).check()


@pytest.mark.parametrize("space", ["transfer", "lora"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_bert"])
def test_shipped_spaces_check_against_tiny_models(data_dir: Path, space: str, model: str) -> None:
    task = "classification" if model == "tiny_bert" else "instruction"
    cfg = compose(tiny_overrides(data_dir, task=task, model=model) + [f"sweep={space}"], "sweep")
    checked, blocks = check(cfg)
    bounded = [s for s in checked.values() if s.key == "strategy.num_trainable_blocks"]
    assert bounded and bounded[0].high == blocks == 4  # `high: null` = the model's blocks


def test_default_sweep_composes_for_the_embedded_demo() -> None:
    cfg = compose([], config_name="sweep")
    assert cfg.model.name == "minilm" and cfg.sweep is not None
    assert cfg.sweep.baseline == "scratch"
    assert cfg.sweep.objectives[0].metric == "eval_accuracy"
    assert set(cfg.sweep.space) == {
        "strategy",
        "freeze_depth",
        "lr",
        "lr_light",
        "lr_ratio",
        "lora_rank",
        "lora_alpha",
        "unfreeze_every",
        "final_depth",
    }
    assert cfg.sweep.space["lora_rank"].choices == [4, 8, 16, 32, 64]
    assert "progressive" in cfg.sweep.space["strategy"].choices


def test_the_transfer_space_starts_from_each_strategys_usual_setting(data_dir: Path) -> None:
    cfg = compose(tiny_overrides(data_dir, task="classification", model="tiny_bert"), "sweep")
    space, _ = check(cfg)
    assert cfg.sweep is not None
    points = {p["strategy"]: p for p in cfg.sweep.enqueue}
    assert set(points) == set(space["strategy"].choices or [])  # every strategy once
    lrs = {}
    for strategy, params in points.items():
        trial_cfg = space_lib.apply(space_lib.trial_base(cfg), space, params)
        assert trial_cfg.strategy.name == strategy
        lrs[strategy] = trial_cfg.train.lr
    assert lrs == {
        "lora": 1e-3,
        "feature_extraction": 1e-3,
        "freeze_depth": 3e-4,
        "progressive": 3e-4,
        "full": 1e-4,
    }


def test_conditional_sampling_follows_the_strategy(data_dir: Path) -> None:
    cfg = _cfg(data_dir)
    space, blocks = check(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        params = space_lib.sample(trial, space)
        study.tell(trial, 0.0)
        strategy = params["strategy"]
        seen.add(strategy)
        assert ("lora_rank" in params) == ("lora_alpha" in params) == (strategy == "lora")
        assert ("freeze_depth" in params) == (strategy == "freeze_depth")
        assert ("lr_ratio" in params) == (strategy != "feature_extraction")
        # One lr range per kind of strategy: blocks train at a small lr, heads/adapters at a larger one.
        light = strategy in ("feature_extraction", "lora")
        assert ("lr_light" in params) == light and ("lr" in params) == (not light)
        lr = params["lr_light"] if light else params["lr"]
        assert (1e-4 <= lr <= 1e-2) if light else (1e-5 <= lr <= 1e-3)
        if "freeze_depth" in params:
            assert 1 <= params["freeze_depth"] <= blocks
        trial_cfg = space_lib.apply(space_lib.trial_base(cfg), space, params)
        assert trial_cfg.strategy.name == strategy and trial_cfg.train.lr == lr
        assert trial_cfg.sweep is None and trial_cfg.run.export is False
        if strategy == "lora":
            assert trial_cfg.strategy.lora.r == params["lora_rank"]
            assert trial_cfg.strategy.lora.alpha == params["lora_alpha"]
        assert (
            ("unfreeze_every" in params) == ("final_depth" in params) == (strategy == "progressive")
        )
        if strategy == "progressive":
            assert trial_cfg.strategy.progressive.unfreeze_every == params["unfreeze_every"]
            assert (
                1 <= trial_cfg.strategy.progressive.final_blocks == params["final_depth"] <= blocks
            )
            trial_cfg.check()  # a sampled schedule is a valid config
    assert seen == {"feature_extraction", "freeze_depth", "lora", "full", "progressive"}


def test_apply_rejects_an_unknown_parameter(data_dir: Path) -> None:
    cfg = _cfg(data_dir)
    space, _ = check(cfg)
    with pytest.raises(ConfigError, match="sweep.space.depth"):
        space_lib.apply(cfg, space, {"depth": 2})


def test_max_t_cuts_trials_to_its_evaluations(data_dir: Path) -> None:
    cfg = _cfg(data_dir, "train.max_steps=24", "train.eval_every=4", "sweep.max_t=3")
    assert space_lib.trial_base(cfg).train.max_steps == 12
    assert space_lib.evaluations(space_lib.trial_base(cfg)) == 3


def test_trials_skip_the_evaluation_before_training_the_full_runs_keep_it(data_dir: Path) -> None:
    cfg = _cfg(data_dir, "train.max_steps=24", "train.eval_every=4", "sweep.max_t=3")
    assert cfg.train.eval_at_start
    assert not space_lib.trial_base(cfg).train.eval_at_start  # it ranks nothing
    full = space_lib.full_base(cfg)  # the retrained best and the baselines
    assert full.train.eval_at_start and full.train.max_steps == 24


def test_names_are_deterministic_and_ignore_how_many_and_where(data_dir: Path) -> None:
    a = _cfg(data_dir)
    assert sweep_name(a) == sweep_name(_cfg(data_dir))
    assert sweep_name(a) == sweep_name(
        _cfg(
            data_dir,
            "sweep.num_trials=40",
            "sweep.max_concurrent=4",
            "sweep.storage=sqlite:///x.db",
        )
    )
    assert sweep_name(a) != sweep_name(_cfg(data_dir, "sweep.space.lr.high=1e-2"))
    # A trial's run name (and so its checkpoints) does not depend on the sweep settings.
    plain = compose(tiny_overrides(data_dir, task="classification"))
    assert run_name(dataclasses.replace(a, sweep=None)) == run_name(plain)


# --------------------------------------------------------------------------- study bookkeeping
def _storage(tmp_path: Path):  # type: ignore[no-untyped-def]
    return study_lib.open_storage(f"sqlite:///{tmp_path / 'study.db'}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_reclaim_requeues_only_a_dead_drivers_running_trials(
    data_dir: Path, tmp_path: Path
) -> None:
    cfg = _cfg(data_dir, "sweep.num_trials=4")
    assert cfg.sweep is not None
    storage = _storage(tmp_path)
    study = study_lib.open_study(cfg.sweep, storage, "s")
    done = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
    study.tell(done, 1.0)
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
    orphan.report(2.0, step=1)
    orphan.set_user_attr("driver", "dead-driver")
    other = study.ask()
    other.set_user_attr("driver", "somebody-else")
    drivers = tmp_path / study_lib.DRIVERS
    drivers.mkdir()
    import socket

    (drivers / "dead-driver.json").write_text(
        json.dumps({"id": "dead-driver", "host": socket.gethostname(), "pid": _dead_pid()})
    )
    assert study_lib.budget_used(study) == 3
    assert study_lib.reclaim(study, tmp_path) == [orphan.number]
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.RUNNING,
    ]
    retry = trials[3]
    assert retry.state == TrialState.WAITING and retry.params == orphan.params
    assert retry.intermediate_values == {1: 2.0}  # the learning curve so far is kept
    assert study_lib.origin(retry) == orphan.number  # it trains in the original's run dir
    # The failed original no longer counts, its queued retry does (once it runs).
    assert study_lib.budget_used(study) == 2 and study_lib.queued(study) == 1
    assert not (drivers / "dead-driver.json").exists()


def test_a_live_driver_keeps_its_trials(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir)
    assert cfg.sweep is not None
    storage = _storage(tmp_path)
    study = study_lib.open_study(cfg.sweep, storage, "s")
    with study_lib.Driver(tmp_path, storage) as driver:
        trial = study.ask()
        trial.set_user_attr("driver", driver.id)
        driver.track(trial._trial_id)
        assert study_lib.reclaim(study, tmp_path) == []
        optuna.storages.fail_stale_trials(study)  # its heartbeat is fresh
        assert study.get_trials()[0].state == TrialState.RUNNING
    assert not driver.path.exists()


def test_storage_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep.storage"):
        study_lib.open_storage("not a url")
    with pytest.raises(ConfigError, match="does not exist"):
        study_lib.open_storage(f"sqlite:///{tmp_path}/missing/dir/study.db")
    with pytest.raises(ConfigError, match="sweep.storage: cannot open"):
        study_lib.open_storage("postgresql://nobody@127.0.0.1:1/nothing")


def test_an_existing_study_with_other_directions_is_refused(data_dir: Path, tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    one = _cfg(data_dir).sweep
    two = _cfg(data_dir, "sweep.objectives=[{metric:eval_loss,mode:min}]").sweep
    assert one is not None and two is not None
    study_lib.open_study(one, storage, "s")
    with pytest.raises(ConfigError, match="sweep.objectives"):
        study_lib.open_study(two, storage, "s")


# --------------------------------------------------------------------------- experiment files
def test_experiment_accepts_plus_and_a_file_path(tmp_path: Path) -> None:
    assert compose(["+experiment=smollm2_lora"]).model.name == "smollm2_135m"
    path = tmp_path / "best.yaml"
    path.write_text(
        "# @package _global_\nstrategy:\n  name: lora\n  lora:\n    r: 4\ntrain:\n  lr: 0.00123\n"
    )
    cfg = compose([f"+experiment={path}", "train.max_steps=7"])
    assert (cfg.strategy.name, cfg.strategy.lora.r, cfg.train.lr) == ("lora", 4, 0.00123)
    assert cfg.train.max_steps == 7
    with pytest.raises(ValueError, match="no such experiment file"):
        compose([f"+experiment={tmp_path / 'nope.yaml'}"])


# --------------------------------------------------------------------------- report
def _fake_sweep(data_dir: Path, tmp_path: Path, objectives: str) -> Path:
    """A real SQLite study with complete, pruned and failed trials, as a sweep writes it."""
    from jobs.config import to_yaml

    cfg = _cfg(data_dir, f"sweep.objectives={objectives}")
    assert cfg.sweep is not None
    space, _ = check(cfg)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    url = f"sqlite:///{sweep_dir / 'study.db'}"
    study = study_lib.open_study(cfg.sweep, study_lib.open_storage(url), "s")
    study.sampler = optuna.samplers.RandomSampler(seed=1)
    multi = len(cfg.sweep.objectives) > 1
    for i in range(7):
        trial = study.ask()
        params = space_lib.sample(trial, space)
        curve = [[e, 0.5 + 0.05 * i - 0.1 * e] for e in (1, 2) if not (i == 2 and e == 2)]
        trial.set_user_attr("curve", curve)
        if i in (0, 1):  # finished with the forgetting probe on (eval.source_path)
            run_dir = sweep_dir / "trials" / str(i)
            run_dir.mkdir(parents=True)
            end = {
                "event": "end",
                "step": 12,
                "forgotten": 0.125 * (i + 1),
                "eval_accuracy/topic": 0.5 + 0.25 * i,  # (a multi-task run's)
                "eval_accuracy/mean": 0.625,
                "labels": ["neg", "pos"],
                "test_confusion": [[5 - i, 1 + i], [0, 6]],
            }
            (run_dir / "metrics.jsonl").write_text(json.dumps(end) + "\n")
            trial.set_user_attr("run_dir", str(run_dir))
        if i == 2:
            trial.set_user_attr("stopped_at_eval", 1)
            study.tell(trial, state=TrialState.PRUNED)
        elif i == 5:
            study.tell(trial, state=TrialState.FAIL)
        else:
            values = [curve[-1][1]] + ([1000.0 * (7 - i)] if multi else [])
            study.tell(trial, values if multi else values[0])
        del params
    (sweep_dir / "config.yaml").write_text(to_yaml(cfg))
    (sweep_dir / "sweep.json").write_text(
        json.dumps(
            {
                "name": "sweep",
                "study": "s",
                "storage": url,
                "objectives": [dataclasses.asdict(o) for o in cfg.sweep.objectives],
                "space": {k: dataclasses.asdict(v) for k, v in space.items()},
                "evals_per_trial": 2,
                "eval_every": 6,
                "num_trials": 7,
            }
        )
    )
    from jobs.sweep import best_trial

    best = best_trial(study)
    summary = summarize(
        cfg, best, {"scratch": {cfg.sweep.objectives[0].metric: best.values[0] + 0.5}}
    )
    (sweep_dir / "summary.json").write_text(json.dumps(summary))
    return sweep_dir


def test_report_files_plots_and_best_config(data_dir: Path, tmp_path: Path) -> None:
    sweep_dir = _fake_sweep(data_dir, tmp_path, "[{metric:eval_loss,mode:min}]")
    out = write_report(sweep_dir)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    best = study.best_trial
    assert f"Best trial: {best.number}" in md and f"Best trial: {best.number}" in page
    # Scratch did worse than the best (higher loss): no negative-transfer warning.
    assert "NEGATIVE TRANSFER" not in md and "Transfer gain" in md
    assert "| 2 | pruned |" in md and "| 5 | fail |" in md
    # The forgetting probe's measure beside the objective, where the trials have it.
    assert "| forgotten |" in md and "<th>forgotten</th>" in page
    # and a multi-task run's per-task accuracies, the mean last
    header = next(line for line in md.splitlines() if line.startswith("| trial"))
    assert "| forgotten | eval_accuracy/topic | eval_accuracy/mean |" in header
    row = next(line for line in md.splitlines() if line.startswith("| 1 "))
    assert "| 0.25 | 0.75 | 0.625 |" in row
    for name in (
        "history",
        "curves",
        "slices",
        "parallel",
        "importances",
        "baselines",
        "confusion",
    ):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        assert f"{name}.png" in md and f"{name}.png" in page
    # Optuna's plots also as interactive plotly pages that work offline
    for name in ("history", "slices", "parallel", "importances"):
        live = (out / f"{name}.html").read_text()
        assert "plotly.min.js" in live and "Plotly.newPlot" in live, name
        assert f"href='{name}.html'" in page
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    experiment = (out / "best.yaml").read_text()
    assert experiment.startswith("# @package _global_")
    rerun = compose([f"+experiment={out / 'best.yaml'}"])
    assert rerun.train.lr == pytest.approx(best.params["lr"])
    assert rerun.strategy.name == best.params["strategy"]
    assert rerun.data.path == str(data_dir / "cls.jsonl")
    # Not retrained: the trial's length, but a run as the user asked for one (the trials
    # skipped the evaluation before training).
    assert rerun.train.eval_at_start and rerun.train.max_steps == 12


def test_per_class_precision_recall_from_a_confusion_matrix() -> None:
    from jobs.report import confusion_of, per_class

    end = {
        "labels": ["a", "b"],
        "eval_confusion": [[3, 1], [2, 4]],
        "test_confusion": [[5, 0], [1, 4]],
    }
    split, matrix, labels = confusion_of(end)  # type: ignore[misc]
    assert split == "test" and labels == ["a", "b"]
    rows = per_class(matrix, labels)
    assert rows["a"] == {"precision": 5 / 6, "recall": 1.0, "support": 5}
    assert rows["b"] == {"precision": 1.0, "recall": 0.8, "support": 5}
    assert confusion_of({"eval_loss": 1.0}) is None


def test_report_pareto_front_and_negative_transfer(data_dir: Path, tmp_path: Path) -> None:
    sweep_dir = _fake_sweep(
        data_dir,
        tmp_path,
        "[{metric:eval_accuracy,mode:max},{metric:trainable_params,mode:min}]",
    )
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["negative_transfer"] is True  # scratch scored higher accuracy
    out = write_report(sweep_dir)
    md = (out / "report.md").read_text()
    assert "NEGATIVE TRANSFER" in md and "(Pareto)" in md
    assert (out / "pareto.png").read_bytes().startswith(PNG)


def test_baselines_reuse_the_best_settings(data_dir: Path) -> None:
    from jobs.sweep import baseline_config

    cfg = _cfg(data_dir)
    space, _ = check(cfg)
    best = {"strategy": "lora", "lr": 2e-3, "lr_ratio": 0.5, "lora_rank": 16, "lora_alpha": 32}
    scratch = baseline_config(cfg, space, best, "scratch")
    probe = baseline_config(cfg, space, best, "linear_probe")
    for ref in (scratch, probe):  # same data, budget and lr as the best trial
        assert ref.train.lr == 2e-3 and ref.train.max_steps == cfg.train.max_steps
        assert ref.data == cfg.data and ref.sweep is None
    # scratch: random init, every weight trains; linear probe: pretrained, head only.
    assert scratch.model.pretrained is False and scratch.strategy.name == "full"
    assert probe.model.pretrained is True and probe.strategy.name == "feature_extraction"


def test_the_summary_reports_test_scores_beside_the_validation_choice(
    data_dir: Path, tmp_path: Path
) -> None:
    """The best trial is chosen on validation; its (and each baseline's) test split
    score is carried into the summary, for the report."""
    from types import SimpleNamespace

    from jobs import runlog

    run_dir = tmp_path / "trials" / "3"
    log = runlog.RunLog(run_dir, enabled=True)
    log.log(
        {"event": "end", "step": 12, "eval_accuracy": 0.9, "test_accuracy": 0.8, "test_loss": 0.5}
    )
    log.close()
    best = SimpleNamespace(
        number=3, values=[0.9], params={"lr": 0.01}, user_attrs={"run_dir": str(run_dir)}
    )
    cfg = compose(
        tiny_overrides(data_dir, task="classification")
        + ["sweep.objectives=[{metric:eval_accuracy,mode:max}]"],
        config_name="sweep",
    )
    scratch = {"eval_accuracy": 0.6, "test_accuracy": 0.55}
    summary = summarize(cfg, best, {"scratch": scratch})
    assert summary["best"]["test"] == {"test_accuracy": 0.8, "test_loss": 0.5}
    assert summary["baselines_test"] == {"scratch": {"test_accuracy": 0.55}}
    assert summary["transfer_gain"] == pytest.approx(0.3)  # still judged on validation


def test_a_driver_killed_inside_ask_leaves_no_unowned_running_trial(
    data_dir: Path, tmp_path: Path
) -> None:
    """The race the scripted driver-kill test hit: SIGKILL between study.ask() and the
    write that marks the trial as the driver's left a RUNNING trial with no owner (and no
    heartbeat), which nothing ever re-queued. The driver file's "asking" mark lets the
    next driver reclaim it, and only it."""
    import socket
    import time

    cfg = _cfg(data_dir, "sweep.num_trials=4")
    assert cfg.sweep is not None
    storage = _storage(tmp_path)
    study = study_lib.open_study(cfg.sweep, storage, "s")
    live_unmarked = study.ask()  # a live driver, between its ask and its mark, long ago
    time.sleep(1.5)
    drivers = tmp_path / study_lib.DRIVERS
    drivers.mkdir()
    asked = time.time()
    orphan = study.ask()  # the dead driver's: asked, never marked
    (drivers / "dead.json").write_text(
        json.dumps(
            {"id": "dead", "host": socket.gethostname(), "pid": _dead_pid(), "asking": asked}
        )
    )
    assert study_lib.reclaim(study, tmp_path) == [orphan.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[orphan.number] == TrialState.FAIL
    assert states[live_unmarked.number] == TrialState.RUNNING
    assert study_lib.queued(study) == 1  # the orphan's retry


def test_the_driver_marks_an_ask_in_its_file_while_it_lasts(tmp_path: Path) -> None:
    storage = _storage(tmp_path)
    with study_lib.Driver(tmp_path, storage) as driver:
        with driver.asking():
            assert "asking" in json.loads(driver.path.read_text())
        assert "asking" not in json.loads(driver.path.read_text())


def test_steps_used_counts_what_ended_trials_trained_and_running_ones_in_full() -> None:
    from jobs.sweep import steps_used

    study = optuna.create_study(direction="minimize")
    done = study.ask()
    done.set_user_attr("step", 12)
    study.tell(done, 1.0)
    pruned = study.ask()
    pruned.set_user_attr("curve", [[1, 2.0]])  # stopped at its first evaluation (4 steps)
    study.tell(pruned, state=TrialState.PRUNED)
    study.ask()  # running
    assert steps_used(study, eval_every=4, trial_steps=12) == (16, 12)


def test_the_summary_carries_the_retrained_best_weak_transfer_and_compute(
    data_dir: Path, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    best = SimpleNamespace(number=2, values=[0.70], params={"lr": 0.01}, user_attrs={})
    cfg = _cfg(data_dir, "sweep.objectives=[{metric:eval_accuracy,mode:max}]")
    retrained = {"eval_accuracy": 0.80, "step": 12, "test_accuracy": 0.78, "run_dir": None}
    scratch = {"eval_accuracy": 0.79, "lr": 0.03, "search": [{"lr": 0.01}, {"lr": 0.03}]}
    summary = summarize(cfg, best, {"scratch": scratch}, retrained=retrained, spent=30, complete=2)
    # the gain is measured against the retrained best (the baselines' budget)
    assert summary["transfer_gain"] == pytest.approx(0.01)
    assert summary["weak_transfer"] is True and summary["negative_transfer"] is False
    assert summary["retrained"]["test"] == {"test_accuracy": 0.78}
    assert summary["baselines_lr"] == {"scratch": 0.03}
    assert summary["compute"]["trial_full_runs"] == pytest.approx(30 / 12)
    assert summary["compute"]["baseline_full_runs"] == 2
    assert "only 2 trial(s) completed" in summary["warning"]
    from jobs.sweep import describe_summary

    text = "\n".join(describe_summary(summary))
    assert "WEAK TRANSFER" in text and "best of 2 lrs: 0.03" in text and "2.50 full runs" in text


def _example_sums(run_dir: Path, correct: list[int]) -> None:
    """A classification run's per-example sums for 2 labels: [loss, count, correct, 2x2]."""
    import torch

    from jobs.worker import EXAMPLE_SUMS

    rows = []
    for c in correct:
        confusion = [1.0, 0.0, 0.0, 0.0] if c else [0.0, 1.0, 0.0, 0.0]
        rows.append(torch.tensor([0.5, 1.0, float(c), *confusion], dtype=torch.float64))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack(rows), run_dir / EXAMPLE_SUMS.format(split="test"))


def test_the_bootstrap_interval_of_a_gain(data_dir: Path, tmp_path: Path) -> None:
    from jobs.sweep import bootstrap_gain

    cfg = _cfg(data_dir)
    n = 400
    _example_sums(tmp_path / "a", [1 if i % 10 < 8 else 0 for i in range(n)])  # 0.8
    _example_sums(tmp_path / "b", [1 if i % 10 < 6 else 0 for i in range(n)])  # 0.6
    gain = bootstrap_gain(cfg, tmp_path / "a", tmp_path / "b", "eval_accuracy", 1)
    assert gain is not None and gain["split"] == "test" and gain["n"] == n
    assert gain["gain"] == pytest.approx(0.2)
    low, high = gain["ci95"]
    assert 0.1 < low < 0.2 < high < 0.3  # paired: the interval is tight around 0.2
    same = bootstrap_gain(cfg, tmp_path / "a", tmp_path / "a", "eval_accuracy", 1)
    assert same is not None and same["gain"] == 0 and same["ci95"] == [0, 0]
    assert bootstrap_gain(cfg, tmp_path / "a", tmp_path / "missing", "eval_accuracy", 1) is None


def test_baselines_search_their_own_lr_at_the_full_budget(data_dir: Path) -> None:
    from jobs.sweep import baseline_config

    cfg = _cfg(data_dir, "sweep.max_t=1")  # trials train 6 of the 12 steps
    space, _ = check(cfg)
    assert space_lib.trial_base(cfg).train.max_steps == 6
    best = {"strategy": "full", "lr": 2e-3, "lr_ratio": 1.0}
    scratch = baseline_config(cfg, space, best, "scratch", 10.0)
    assert scratch.train.lr == pytest.approx(2e-2) and scratch.train.max_steps == 12
    assert scratch.run.export is False


def test_a_baseline_lr_grid_grows_past_the_end_where_its_best_is(tmp_path: Path) -> None:
    """The best trial's lr anchors the grid; when the baseline's best is at an end (a
    head-only trial's large lr anchoring scratch), one more lr past that end is tried."""
    from conf.schema import ObjectiveConfig as Objective
    from jobs.sweep import _extend

    def runs(scores: dict[float, float]) -> dict[float, Path]:
        out = {}
        for mult, score in scores.items():
            d = tmp_path / f"m{mult:g}-{len(list(tmp_path.iterdir()))}"
            d.mkdir()
            (d / "metrics.jsonl").write_text(
                json.dumps({"event": "end", "eval_accuracy": score}) + "\n"
            )
            out[mult] = d
        return out

    acc = Objective(metric="eval_accuracy", mode="max")
    grid = [1.0, 3.0, 10.0]
    assert _extend(grid, runs({1: 0.3, 3: 0.2, 10: 0.1}), acc) == [pytest.approx(1 / 3)]
    assert _extend(grid, runs({1 / 3: 0.5, 1: 0.3, 3: 0.2, 10: 0.1}), acc) == [pytest.approx(1 / 9)]
    assert _extend(grid, runs({1: 0.1, 3: 0.2, 10: 0.3}), acc) == [pytest.approx(100 / 3)]
    assert _extend(grid, runs({1: 0.1, 3: 0.4, 10: 0.3}), acc) == []  # inside: done
    # the top lr diverged (no finite score): never go higher
    diverged = runs({1: 0.1, 3: 0.4})
    diverged[10.0] = tmp_path / "nan"
    assert _extend(grid, diverged, acc) == []
    loss = Objective(metric="eval_accuracy", mode="min")
    assert _extend(grid, runs({1: 0.3, 3: 0.2, 10: 0.1}), loss) == [pytest.approx(100 / 3)]
    assert _extend([3.0], runs({3: 0.3}), acc) == []


def _open_at_once(url: str, barrier: Any, errors: Any) -> None:
    barrier.wait()
    try:
        study_lib.open_storage(url)
    except Exception as e:  # reported to the parent, which asserts there were none
        errors.put(f"{type(e).__name__}: {e}")


def test_drivers_opening_a_new_postgresql_database_at_once_do_not_collide() -> None:
    """Two drivers started together on an empty PostgreSQL database both create Optuna's
    tables; unserialised, one of them died on pg_type's unique index (seen in CI). Each
    round: a new database, 4 processes opening it at the same instant."""
    import multiprocessing

    import psycopg2

    try:
        admin = psycopg2.connect(
            host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3
        )
    except Exception as e:
        pytest.skip(f"no PostgreSQL answers at 127.0.0.1:5432 (database test): {e}")
    admin.autocommit = True
    ctx = multiprocessing.get_context("fork")
    try:
        for _ in range(3):
            name = f"graft_race_{uuid.uuid4().hex[:8]}"
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE {name}")
            try:
                barrier, errors = ctx.Barrier(4), ctx.Queue()
                procs = [
                    ctx.Process(
                        target=_open_at_once,
                        args=(f"postgresql://postgres@127.0.0.1:5432/{name}", barrier, errors),
                    )
                    for _ in range(4)
                ]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join(120)
                found = []
                while not errors.empty():
                    found.append(errors.get())
                assert [p.exitcode for p in procs] == [0] * 4 and not found, found
                # and the schema they made is whole: a study can be created in it
                storage = study_lib.open_storage(f"postgresql://postgres@127.0.0.1:5432/{name}")
                optuna.create_study(storage=storage, study_name="after")
                assert [s.study_name for s in storage.get_all_studies()] == ["after"]
                storage.engine.dispose()
            finally:
                with admin.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


def test_a_loss_terms_knobs_are_sweep_parameters(data_dir: Path) -> None:
    """objectives.<name>.weight and objectives.<name>.args.<arg> address a term by name
    (in a space file: `dann_weight: {key: objectives.dann.weight, type: log_float, ...}`)."""
    target = data_dir / "target.jsonl"
    term = f"objectives=[{{name:dann,weight:0.1,args:{{target_path:{target}}}}}]"

    def with_knobs(**knobs: ParamSpec) -> FinetuneConfig:
        cfg = compose(tiny_overrides(data_dir, task="classification") + [term], "sweep")
        assert cfg.sweep is not None
        cfg.sweep.space.update(knobs)
        return cfg

    cfg = with_knobs(
        dann_weight=ParamSpec(key="objectives.dann.weight", type="log_float", low=0.01, high=1.0),
        dann_lambda=ParamSpec(key="objectives.dann.args.lambda", type="float", low=0.1, high=1.0),
    )
    space, _ = check(cfg)
    params = {"strategy": "full", "lr": 1e-3, "lr_ratio": 1.0, "dann_weight": 0.3}
    params["dann_lambda"] = 0.5
    trial = space_lib.apply(space_lib.trial_base(cfg), space, params)
    assert trial.objectives[0].weight == 0.3 and trial.objectives[0].args["lambda"] == 0.5
    assert trial.objectives[0].args["target_path"] == str(target)  # the rest as given
    assert cfg.objectives[0].weight == 0.1  # the base is left as it was
    for key, says in (
        ("objectives.l2sp.weight", "no loss term 'l2sp' in objectives"),
        ("objectives.dann.hidden", "objectives.dann.args.<arg>"),
    ):
        bad = with_knobs(x=ParamSpec(key=key, type="float", low=0.1, high=1.0))
        with pytest.raises(ConfigError) as info:
            check(bad)
        assert info.value.key == "sweep.space.x.key" and says in str(info.value), str(info.value)


def test_zero_and_few_shot_baselines_in_the_summary_with_the_gain_over_them(
    data_dir: Path, tmp_path: Path
) -> None:
    """sweep.baseline=[zero_shot, few_shot]: scored on the driver with the best trial's
    model and data (no gang, no lr search, no full runs counted), each in the summary
    with the fine-tuned best's gain over it on validation and, paired, on test."""
    from types import SimpleNamespace

    import torch

    from jobs import runlog
    from jobs.sweep import describe_summary, run_baselines

    cfg = compose(
        tiny_overrides(data_dir, task="classification", model="tiny_bert")
        + ["data.test_fraction=0.2", "sweep.baseline=[zero_shot,few_shot]", "eval.shots=2"]
        + ["sweep.objectives=[{metric:eval_accuracy,mode:max}]"],
        config_name="sweep",
    )
    space, _ = check(cfg)
    sweep_dir = tmp_path / "sweep"
    best_dir = sweep_dir / "trials" / "0"
    params = {"strategy": "full", "lr": 0.01, "lr_ratio": 1.0}
    best = SimpleNamespace(
        number=0, values=[0.95], params=params, user_attrs={"run_dir": str(best_dir)}
    )
    baselines = run_baselines(cfg, space, best, sweep_dir, pools=None)  # type: ignore[arg-type]
    assert list(baselines) == ["zero_shot", "few_shot"]
    zero = runlog.read(sweep_dir / "baselines" / "zero_shot")[-1]
    assert (
        zero["event"] == "end" and baselines["zero_shot"]["eval_accuracy"] == zero["eval_accuracy"]
    )
    # The best run: every test example right (its rows: the zero-shot run's, all correct).
    rows = torch.load(
        sweep_dir / "baselines" / "zero_shot" / runlog.EXAMPLE_SUMS.format(split="test")
    )
    rows[:, 2] = rows[:, 1]
    best_dir.mkdir(parents=True)
    torch.save(rows, best_dir / runlog.EXAMPLE_SUMS.format(split="test"))
    log = runlog.RunLog(best_dir, enabled=True)
    log.log({"event": "end", "step": 12, "eval_accuracy": 0.95, "test_accuracy": 1.0})
    log.close()

    summary = summarize(cfg, best, baselines, spent=24)
    assert summary["compute"]["baseline_full_runs"] == 0
    assert summary["baselines"]["few_shot"] == baselines["few_shot"]["eval_accuracy"]
    gain = summary["gain_over_untrained"]["zero_shot"]
    assert gain["gain"] == pytest.approx(0.95 - zero["eval_accuracy"])
    assert gain["held_out"]["split"] == "test"
    assert gain["held_out"]["gain"] == pytest.approx(1.0 - zero["test_accuracy"])
    lines = "\n".join(describe_summary(summary))
    assert "baseline zero_shot: eval_accuracy" in lines and "baseline few_shot" in lines
    assert "fine-tuning gain over zero_shot (best - zero_shot) on eval_accuracy" in lines


# --------------------------------------------------------------------------- dashboards
def _serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``graft dashboard ...`` in a process of its own; returns it and the URL it printed."""
    import select

    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "dashboard", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    seen = []
    while select.select([proc.stdout], [], [], 60)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if " at http://" in line:
            return proc, line.split(" at ", 1)[1].split()[0]
    proc.kill()
    raise AssertionError(f"graft dashboard printed no URL: {''.join(seen)}")


def _get(url: str, want: str, timeout: float = 60.0) -> str:
    """The body at ``url`` once it holds ``want`` (a server loads its data in the background)."""
    import time
    import urllib.error
    import urllib.request

    deadline, body = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read().decode()
            if want in body:
                return body
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never held {want!r}; last: {body[:300]}")


def test_dashboard_serves_the_sweep_study_over_http(data_dir: Path, tmp_path: Path) -> None:
    sweep_dir = _fake_sweep(data_dir, tmp_path, "[{metric:eval_loss,mode:min}]")
    proc, url = _serve(str(sweep_dir))
    try:
        root = url.split("/dashboard")[0]
        studies = json.loads(_get(f"{root}/api/studies", '"s"'))["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == "s"]
        trials = json.loads(_get(f"{root}/api/studies/{study['study_id']}", "trials"))["trials"]
        assert len(trials) == 7
        assert "<html" in _get(url, "<html").lower()
    finally:
        proc.kill()
        proc.wait()


def test_dashboard_serves_a_runs_tensorboard_over_http(data_dir: Path, tmp_path: Path) -> None:
    from jobs import runlog

    run_dir = tmp_path / "runs" / "one"
    run_dir.mkdir(parents=True)
    log = runlog.RunLog(run_dir, enabled=True)
    for step in range(1, 4):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    proc, url = _serve(str(tmp_path / "runs"))  # the folder of runs: each run a TensorBoard run
    try:
        tags = json.loads(_get(f"{url.rstrip('/')}/data/plugin/scalars/tags", "loss"))
        assert "loss" in tags["one/tensorboard"]
    finally:
        proc.kill()
        proc.wait()


def test_a_folder_without_a_sweep_or_logs_is_refused_before_serving(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "dashboard", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "RUN_OR_SWEEP" in out.stderr and "run.loggers=[tensorboard]" in out.stderr


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="needs Debian's chromium (make install-browser; .ci/run does it)"
)
def test_the_report_page_renders_its_plots_in_a_real_browser(
    data_dir: Path, tmp_path: Path
) -> None:
    """report.html in headless Chromium: every plot image loads (a broken <img> is a small
    grey icon) and the screenshot is mostly the plots' colours, not an empty page."""
    from PIL import Image

    sweep_dir = _fake_sweep(data_dir, tmp_path, "[{metric:eval_loss,mode:min}]")
    out = write_report(sweep_dir)
    # The page reports how many of its images decoded, in its title, for the screenshot run.
    page = (out / "report.html").read_text()
    probe = out / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>window.onload=()=>{const i=[...document.images];"
            "document.title='loaded '+i.filter(x=>x.complete&&x.naturalWidth>100).length+"
            "' of '+i.length;document.body.insertAdjacentHTML('afterbegin',"
            "'<h1 id=probe>'+document.title+'</h1>')}</script></body>",
        )
    )
    shot = tmp_path / "report.png"
    dom = subprocess.run(
        [
            str(_chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    images = page.count("<img ")
    assert images >= 6 and f"loaded {images} of {images}" in dom, dom[:500]
    subprocess.run(
        [
            str(_chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,4000",
            f"--screenshot={shot}",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 4000)
    colour = sum(
        1 for r, g, b in image.getdata() if max(r, g, b) - min(r, g, b) > 60
    )  # plot marks, bars and lines; the page's text and table are black, grey or white
    assert colour > 20_000, f"only {colour} coloured pixels: the plots did not render"
