"""The sweep job: Optuna over the transfer space, on Ray Tune, trials trained by a pool of
long-lived Ray Train gangs.

    python -m jobs.sweep [hydra overrides]          # same as: graft sweep [...]
    python -m jobs.sweep model=tiny_bert data=jsonl data.path=x.jsonl sweep.num_trials=12

Layers, top to bottom:
  run(cfg)            the driver: checks, study, the pool (jobs.pool), Tuner(searcher=
                      StudySearcher, scheduler=StratifiedASHA), retrain, baselines, report
  StudySearcher       a Tune Searcher whose state lives in the Optuna study (so reruns and
                      other drivers share it): ask -> sample the space -> trial config
                      (while sweep.budget allows); results -> intermediate values; the
                      end -> tell (complete/pruned/fail), a stopped trial's run cancelled
  _trial(config)      one Tune trial: the trial's FinetuneConfig handed to a free gang of
                      the pool, its reports passed on to Tune (``run(trial=...)`` swaps
                      it: scripted learning curves in tests)
  retrain_best, run_baselines, summarize, bootstrap_gain   after the trials
Resources: a trial's driver function holds no CPU or GPU (only a little memory); each
gang reserves its workers' bundles in its own placement group, once for the sweep.
Trials run at most as many at once as the cluster fits whole gangs, so a trial never
waits on resources its own driver holds (the nested Tune/Train deadlock) and gangs
never half-start.

The sweep directory, runs/<sweep-name>/: sweep.json, config.yaml, study.db (SQLite
default), trials/<n>/ (each a fine-tuning run directory), best/ (the retrained best),
baselines/<kind>/lr_<lr>/, pool/, summary.json, report/ and drivers/ (the live drivers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune.search import Searcher
from rich.console import Console

from conf.schema import (
    ConfigError,
    FinetuneConfig,
    ParamSpec,
    StrategyConfig,
    SweepConfig,
    baseline_kinds,
)
from jobs import config as config_lib
from jobs import runlog, zeroshot
from jobs import space as space_lib
from jobs import study as study_lib
from jobs.preflight import preflight

console = Console(highlight=False, soft_wrap=True)
# What a trial's driver function holds: no CPU (it only waits on its gang), some memory.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 256 * 1024**2}
# Sweep settings that do not change what is searched: they stay out of the sweep's name.
_NOT_IN_NAME = (
    "num_trials",
    "max_concurrent",
    "storage",
    "study",
    "baseline",
    "budget",
    "retrain_best",
    "scratch_lr_mults",
    "probe_lr_mults",
    "baseline_lr_extend",
    "weak_transfer_margin",
)


@dataclasses.dataclass
class SweepSummary:
    sweep_dir: Path
    study_name: str
    storage: str
    best: dict[str, Any] | None
    baselines: dict[str, dict[str, Any]]
    report_dir: Path | None


def sweep_name(cfg: FinetuneConfig) -> str:
    """``run.name``, or sweep-model-data-space-<hash>: rerunning the same command finds
    the same directory and study (and resumes)."""
    assert cfg.sweep is not None
    if cfg.run.name:
        return cfg.run.name
    content = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("run", "cluster")}
    content["sweep"] = {k: v for k, v in content["sweep"].items() if k not in _NOT_IN_NAME}
    content["train"].pop("max_failures", None)  # (recovery, not what is trained)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return f"sweep-{cfg.model.name}-{cfg.data.name}-{cfg.sweep.name}-{digest[:8]}"


run_name = sweep_name  # the name every job module gives its runs (cluster.cli)


def check(cfg: FinetuneConfig) -> tuple[dict[str, ParamSpec], int]:
    """Every sweep error, before the study or Ray is touched: the base config, the space
    against the model, the scheduler's budget. Returns (space, model blocks)."""
    sweep = cfg.sweep
    if sweep is None:
        raise ConfigError("sweep", "missing: compose with config_name='sweep' (graft sweep)")
    facts = preflight(cfg)
    for kind in baseline_kinds(sweep.baseline):
        if kind in zeroshot.KINDS:
            try:
                zeroshot.check(cfg, kind)
            except ConfigError as e:
                raise ConfigError("sweep.baseline", f"{kind}: {e}") from None
    space = space_lib.check_space(cfg, num_blocks=facts.num_blocks)
    evals = space_lib.evaluations(cfg)
    if sweep.scheduler == "stratified" and sweep.stratify_by is not None:
        if sweep.stratify_by not in space:
            raise ConfigError(
                "sweep.stratify_by",
                f"{sweep.stratify_by!r} is not a parameter of the space; allowed: "
                f"{', '.join(space)} or null (one stratum)",
            )
    trial_steps = space_lib.trial_base(cfg).train.max_steps
    if sweep.budget is not None and sweep.budget < trial_steps:
        raise ConfigError(
            "sweep.budget",
            f"{sweep.budget} steps do not cover one trial of {trial_steps} steps; "
            f"allowed: >= {trial_steps}",
        )
    if sweep.max_t is not None and sweep.max_t > evals:
        raise ConfigError(
            "sweep.max_t",
            f"{sweep.max_t} is more than the {evals} evaluations a trial makes "
            f"(train.max_steps={cfg.train.max_steps} / train.eval_every={cfg.train.eval_every}); allowed: 1..{evals}",
        )
    if sweep.max_t is None and sweep.grace_period > evals:
        raise ConfigError(
            "sweep.grace_period",
            f"{sweep.grace_period} is more than the {evals} evaluations a trial makes; allowed: 1..{evals}",
        )
    base = space_lib.trial_base(cfg)
    for i, params in enumerate(sweep.enqueue):
        try:
            preflight(space_lib.apply(base, space, params))
        except ConfigError as e:
            raise ConfigError(f"sweep.enqueue[{i}]", str(e)) from None
    return space, facts.num_blocks


def concurrency(cfg: FinetuneConfig) -> tuple[int, int]:
    """(trials run at once, gangs the cluster fits at once)."""
    import ray

    from jobs.finetune import gang_bundle

    assert cfg.sweep is not None
    resources = ray.cluster_resources()
    fits = min(
        math.floor(resources.get(name, 0) / (amount * cfg.scaling.num_workers))
        for name, amount in gang_bundle(cfg).items()
    )
    return max(1, min(cfg.sweep.max_concurrent, fits)), fits


# --------------------------------------------------------------------------- searcher
class StudySearcher(Searcher):  # type: ignore[misc]
    """A Tune Searcher whose state is the Optuna study: ask -> sample the space -> the
    trial's config; results -> the learning curve (and Optuna intermediate values); the
    trial's end -> tell COMPLETE (its final report arrived), PRUNED (the scheduler stopped
    it first) or FAIL."""

    def __init__(
        self,
        sweep: SweepConfig,
        space: dict[str, ParamSpec],
        study: Any,
        driver: study_lib.Driver,
        sweep_dir: Path,
        progress: Progress,
        stop_run: Callable[[str], None] = lambda run_dir: None,
        *,
        eval_every: int = 1,
        trial_steps: int = 1,
    ) -> None:
        super().__init__(metric=sweep.objectives[0].metric, mode=sweep.objectives[0].mode)
        self.sweep, self.space, self.study = sweep, space, study
        self.driver, self.sweep_dir, self.progress = driver, sweep_dir, progress
        self.stop_run = stop_run  # a trial stopped from outside: its gang moves on
        self.eval_every, self.trial_steps = eval_every, trial_steps  # for sweep.budget
        self.live: dict[str, Any] = {}
        self.curves: dict[str, list[list[float]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm into the experiment state; the study, the
        # driver's heartbeat thread and live trials stay in this process.
        skip = ("study", "driver", "progress", "live", "stop_run")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def save(self, checkpoint_path: str) -> None:
        # Tune snapshots its searcher; this one's state is the study itself.
        Path(checkpoint_path).write_text(json.dumps({"study": self.study.study_name}))

    def restore(self, checkpoint_path: str) -> None:
        pass  # a rerun reads the study (see study.reclaim), not Tune's snapshot

    def suggest(self, trial_id: str) -> Any:  # a config dict, or Searcher.FINISHED
        import optuna

        study, sweep = self.study, self.sweep
        optuna.storages.fail_stale_trials(study)
        if not study_lib.queued(study) and study_lib.budget_used(study) >= sweep.num_trials:
            return Searcher.FINISHED
        if sweep.budget is not None:
            spent, running = steps_used(study, self.eval_every, self.trial_steps)
            if spent + running + self.trial_steps > sweep.budget:
                # Pruning a running trial may make room; with none running it never will.
                return None if self.live else Searcher.FINISHED
        # Claimed before anything else: a driver killed between ask() and these writes
        # would leave a RUNNING trial nobody owns (the "asking" mark in the driver file
        # lets the next driver reclaim it).
        with self.driver.asking(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat ... used with Study.optimize": we beat it
            trial = study.ask()  # a queued trial (retry, enqueued point) first, else a new one
            trial.set_user_attr("driver", self.driver.id)
            self.driver.track(trial._trial_id)
        frozen = study._storage.get_trial(trial._trial_id)
        was_queued = bool(frozen.params) or "fixed_params" in frozen.system_attrs
        if not was_queued and study_lib.budget_used(study, before=trial.number) >= sweep.num_trials:
            trial.set_user_attr("over_budget", True)  # another driver took the last slot
            self.driver.untrack(trial._trial_id)
            study.tell(trial, state=TrialState.FAIL)
            return Searcher.FINISHED
        params = space_lib.sample(trial, self.space)
        origin = study_lib.origin(frozen)
        run_dir = self.sweep_dir / "trials" / str(origin)
        trial.set_user_attr("tune_trial_id", trial_id)
        trial.set_user_attr("run_dir", str(run_dir))
        self.live[trial_id] = trial
        self.curves[trial_id] = [list(p) for p in frozen.user_attrs.get("curve", [])]
        self.progress.started(trial.number, params, resumed=origin != trial.number)
        return {"number": trial.number, "params": params, "run_dir": str(run_dir)}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        trial = self.live.get(trial_id)
        metric = self.sweep.objectives[0].metric
        if trial is None or metric not in result:
            return
        evals, value = int(result["evals"]), float(result[metric])
        curve = self.curves[trial_id]
        new_point = not curve or curve[-1][0] < evals
        if new_point or curve[-1] != [evals, value]:
            # A retry that restarted before its predecessor's last point replaces the tail.
            curve[:] = [p for p in curve if p[0] < evals] + [[evals, value]]
            trial.set_user_attr("curve", curve)
        if new_point:
            if len(self.sweep.objectives) == 1:  # Optuna keeps intermediate values for one
                with warnings.catch_warnings():  # a retry may repeat an inherited step
                    warnings.simplefilter("ignore")
                    trial.report(value, step=evals)
            self.progress.result(trial.number, evals, metric, value)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if result and not error:
            self.on_trial_result(trial_id, result)  # the result the scheduler stopped it on
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        self.driver.untrack(trial._trial_id)
        if error or not (result or {}).get("final"):  # stopped from outside: free its gang
            self.stop_run(trial.user_attrs["run_dir"])
        objectives = self.sweep.objectives
        if error or not result:
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.finished(trial.number, "failed", None)
        elif result.get("final"):
            values = [float(result[o.metric]) for o in objectives]
            for key in ("trainable_params", "train_time_s", "step"):
                if key in result:
                    trial.set_user_attr(key, result[key])
            self.study.tell(trial, values)
            self.progress.finished(trial.number, "complete", values[0])
        else:
            trial.set_user_attr("stopped_at_eval", int(result.get("evals", 0)))
            self.study.tell(trial, state=TrialState.PRUNED)
            self.progress.finished(trial.number, "pruned", result.get(objectives[0].metric))


class Progress:
    """Live progress on the driver: a line per trial start, evaluation and end, with the
    running counts and the best value so far."""

    def __init__(self, metric: str, mode: str, enabled: bool = True) -> None:
        self.metric, self.mode, self.enabled = metric, mode, enabled
        self.counts = {"running": 0, "complete": 0, "pruned": 0, "failed": 0}
        self.best: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def _print(self, text: str) -> None:
        if self.enabled:
            c = self.counts
            best = f"{self.metric} {self.best[0]:.4g} (trial {self.best[1]})" if self.best else "-"
            console.print(
                f"[bold]sweep[/bold] {text}  [dim]| done {c['complete']} running {c['running']} "
                f"pruned {c['pruned']} failed {c['failed']} | best {best}[/dim]"
            )

    def started(self, number: int, params: dict[str, Any], *, resumed: bool) -> None:
        with self._lock:
            self.counts["running"] += 1
            verb = "resumes" if resumed else "starts"
            self._print(f"trial {number} {verb}: {space_lib.describe(params)}")

    def result(self, number: int, evals: int, metric: str, value: float) -> None:
        with self._lock:
            self._print(f"trial {number} eval {evals}: {metric} {value:.4g}")

    def finished(self, number: int, outcome: str, value: float | None) -> None:
        with self._lock:
            self.counts["running"] -= 1
            self.counts[outcome] += 1
            if outcome == "complete" and value is not None:
                better = self.best is None or (
                    value > self.best[0] if self.mode == "max" else value < self.best[0]
                )
                if better:
                    self.best = (value, number)
            shown = f" at {value:.4g}" if value is not None else ""
            self._print(f"trial {number} {outcome}{shown}")


# --------------------------------------------------------------------------- trial
def _trial(
    config: dict[str, Any], *, base: FinetuneConfig, space: dict[str, ParamSpec], dispatcher: Any
) -> None:
    """One Tune trial: the trial's config from its params, trained by a free gang of the
    sweep's pool (jobs.pool); its reports pass through to Tune. The plain config crosses
    to every rank, so all ranks agree. When the scheduler stops the trial, the searcher
    cancels the run and the gang moves on to the next."""
    from ray import tune

    from jobs import pool as pool_lib

    run_dir = Path(config["run_dir"])
    cfg = space_lib.apply(base, space, config["params"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_dir.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    (run_dir / "params.json").write_text(json.dumps(config["params"], indent=2))
    pool_lib.submit(dispatcher, str(run_dir), cfg, run_dir)
    last = space_lib.evaluations(cfg)
    for result in pool_lib.results(dispatcher, str(run_dir)):
        # The last evaluation's report is followed by the final one with the same
        # values; only that one goes to Tune, so no scheduler (Ray's ASHA keeps a rung at
        # max_t) can stop a trial that trained in full and have it counted as pruned.
        if result.get("final") or int(result.get("evals", 0)) < last:
            tune.report(result)


def _scheduler(cfg: FinetuneConfig, evals: int) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    from jobs.schedulers import StratifiedASHA

    sweep = cfg.sweep
    assert sweep is not None
    max_t = min(sweep.max_t or evals, evals)
    if sweep.scheduler == "none":
        return FIFOScheduler()
    if sweep.scheduler == "stratified":
        return StratifiedASHA(
            metric=sweep.objectives[0].metric,
            mode=sweep.objectives[0].mode,
            time_attr="evals",
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
            max_t=max_t,
            min_peers=sweep.min_peers,
            stratify_by=sweep.stratify_by,
        )
    # Trials end by themselves after their last evaluation (stop_last_trials=False), so
    # a finished trial always reaches its final report and is told COMPLETE.
    return AsyncHyperBandScheduler(
        time_attr="evals",
        metric=sweep.objectives[0].metric,
        mode=sweep.objectives[0].mode,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
        max_t=max_t,
        brackets=1 if sweep.scheduler == "asha" else sweep.hyperband_brackets,
        stop_last_trials=False,
    )


def rungs(cfg: FinetuneConfig, evals: int) -> list[int]:
    """The scheduler's rungs in evaluations (none without pruning)."""
    from jobs.schedulers import milestones

    sweep = cfg.sweep
    assert sweep is not None
    if sweep.scheduler == "none":
        return []
    return milestones(sweep.grace_period, sweep.reduction_factor, min(sweep.max_t or evals, evals))


# --------------------------------------------------------------------------- driver
TrialFn = Callable[..., None]


class _Pools:
    """The sweep's gangs (jobs.pool), started on first use (a scripted sweep without
    baselines never starts one) and closed at the end."""

    def __init__(self, cfg: FinetuneConfig, slots: int, root: Path) -> None:
        self.cfg, self.slots, self.root = cfg, slots, root
        self.pool: Any = None

    def get(self) -> Any:
        from jobs.pool import Pool

        if self.pool is None:
            self.pool = Pool.start(self.cfg, slots=self.slots, root=self.root)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def run(
    cfg: FinetuneConfig,
    *,
    show_progress: bool = True,
    report: bool = True,
    trial: TrialFn | None = None,
) -> SweepSummary:
    """Run (or resume) the sweep ``cfg`` describes. Callable in-process and from the CLI.

    ``trial`` is the Tune function each trial runs, ``trial(config, *, base, space)``
    (default: ``_trial``, a Train gang of the trial's config). It is the seam that lets
    the searcher, the scheduler, the budget and resumption run against scripted
    learning curves in seconds (tests/integration/scripted.py)."""
    import optuna
    from ray import tune

    from cluster.connect import connect, describe, join_local, join_message

    started = time.time()
    sweep = cfg.sweep
    space, num_blocks = check(cfg)
    if address := join_local(cfg.cluster):
        console.print(join_message(address))
        cfg.cluster.address = address
    assert sweep is not None
    name = sweep_name(cfg)
    sweep_dir = (Path(cfg.run.output_dir) / name).resolve()
    url = study_lib.storage_url(sweep, sweep_dir)
    # A study database given by URL must answer before anything is written.
    storage = study_lib.open_storage(url) if sweep.storage else None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or study_lib.open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = sweep.study or name
    study = study_lib.open_study(sweep, storage, study_name)
    base = space_lib.trial_base(cfg)
    evals = space_lib.evaluations(base)
    runlog.write_atomic(sweep_dir / "config.yaml", config_lib.to_yaml(cfg))
    runlog.write_atomic(
        sweep_dir / "sweep.json",
        json.dumps(
            {
                "name": name,
                "study": study_name,
                "storage": url if sweep.storage is None else study_lib.redact(url),
                "objectives": [dataclasses.asdict(o) for o in sweep.objectives],
                "space": {k: dataclasses.asdict(v) for k, v in space.items()},
                "evals_per_trial": evals,
                "eval_every": base.train.eval_every,
                "num_trials": sweep.num_trials,
                "scheduler": sweep.scheduler,
                "stratify_by": sweep.stratify_by if sweep.scheduler == "stratified" else None,
                "rungs": rungs(cfg, evals),
                "budget": sweep.budget,
                "trial_steps": base.train.max_steps,
                "full_steps": cfg.train.max_steps,
            },
            indent=2,
        ),
    )
    console.print(f"graft: sweep {name} -> {sweep_dir}")
    console.print(
        f"graft: study {study_name!r} in {study_lib.redact(url)}; {sweep.num_trials} trials, "
        f"{len(space)} parameters ({', '.join(space)}); {cfg.model.name} ({num_blocks} blocks); "
        f"scheduler {sweep.scheduler} over {evals} evaluations of {base.train.eval_every} steps"
    )
    requeued = study_lib.reclaim(study, sweep_dir)
    if requeued:
        console.print(f"graft: re-queued trials {requeued} of a driver that is gone (they resume)")
    if sweep.enqueue and not study.trials:
        for params in sweep.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)

    cluster = connect(cfg.cluster, cfg.scaling)
    console.print(describe(cluster))
    at_once, fits = concurrency(cfg)
    if at_once < sweep.max_concurrent:
        console.print(
            f"graft: sweep.max_concurrent={sweep.max_concurrent} lowered to {at_once}: "
            f"the cluster fits {fits} gang(s) of {cfg.scaling.num_workers} worker(s) at once"
        )

    remaining = sweep.num_trials - study_lib.budget_used(study)  # queued trials included
    primary = sweep.objectives[0]
    progress = Progress(primary.metric, primary.mode, enabled=show_progress)
    pools = _Pools(base, at_once, sweep_dir / "pool")
    try:
        if remaining > 0:
            with study_lib.Driver(sweep_dir, storage) as driver:
                if trial is None:
                    pool = pools.get()
                    trainable = tune.with_parameters(
                        _trial, base=base, space=space, dispatcher=pool.dispatcher
                    )
                    stop_run = pool.cancel
                else:
                    trainable, stop_run = tune.with_parameters(trial, base=base, space=space), None
                searcher = StudySearcher(
                    sweep,
                    space,
                    study,
                    driver,
                    sweep_dir,
                    progress,
                    **({"stop_run": stop_run} if stop_run else {}),
                    eval_every=base.train.eval_every,
                    trial_steps=base.train.max_steps,
                )
                from jobs.schedulers import replay

                scheduler = _scheduler(cfg, evals)
                replayed = replay(scheduler, study_lib.finished_curves(study))
                if replayed:
                    console.print(
                        f"graft: the scheduler's rungs start from the {replayed} trial(s) the "
                        "study already ended"
                    )
                tuner = tune.Tuner(
                    tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES),
                    tune_config=tune.TuneConfig(
                        search_alg=searcher,
                        scheduler=scheduler,
                        num_samples=remaining,
                        max_concurrent_trials=at_once,
                        # A trial's function only hands its config to the pool and
                        # relays reports: one Tune actor per slot runs trial after trial,
                        # so a trial does not pay a fresh actor process and its imports.
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=f"tune-{driver.id}",
                        storage_path=str(sweep_dir / "tune"),
                        verbose=0,
                        failure_config=tune.FailureConfig(max_failures=0),
                    ),
                )
                tuner.fit()
        else:
            console.print(f"graft: the study already holds its {sweep.num_trials} trials")

        best = best_trial(study)
        retrained = retrain_best(cfg, space, best, sweep_dir, pools) if best else None
        baselines = run_baselines(cfg, space, best, sweep_dir, pools) if best else {}
    finally:
        pools.close()
    summary = summarize(
        cfg,
        best,
        baselines,
        retrained=retrained,
        spent=steps_used(study, base.train.eval_every, base.train.max_steps)[0],
        complete=len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
    )
    runlog.write_atomic(sweep_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    _print_summary(summary, time.time() - started)
    report_dir = None
    if report:
        from jobs.report import write_report

        report_dir = write_report(sweep_dir)
        console.print(f"graft: report in {report_dir}")
    return SweepSummary(sweep_dir, study_name, url, summary["best"], baselines, report_dir)


def best_trial(study: Any) -> Any:
    """The best complete trial by the first objective (for several objectives too: the
    Pareto front is in the report)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
    return max(complete, key=lambda t: sign * t.values[0])


def steps_used(study: Any, eval_every: int, trial_steps: int) -> tuple[int, int]:
    """(training steps the ended trials used, steps the running ones may use in all):
    an ended trial used what its learning curve reached, a running one is counted at
    full length (sweep.budget never lets a trial start that it could not finish)."""
    spent = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            running += trial_steps
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            curve = t.user_attrs.get("curve", [])
            reached = int(t.user_attrs.get("step", 0)) or (
                curve[-1][0] * eval_every if curve else 0
            )
            spent += min(reached, trial_steps)
    return spent, running


# --------------------------------------------------------------------------- baselines
def baseline_config(
    cfg: FinetuneConfig,
    space: dict[str, ParamSpec],
    params: dict[str, Any],
    kind: str,
    lr_mult: float = 1.0,
) -> FinetuneConfig:
    """The best trial's settings as a reference run at the full train.max_steps, its lr
    times ``lr_mult``. scratch: same architecture, random init, every weight trains (a
    frozen random backbone would be a strawman); linear_probe: the pretrained backbone
    frozen, only the head trains."""
    trial_cfg = space_lib.apply(space_lib.full_base(cfg), space, params)
    train = dataclasses.replace(trial_cfg.train, lr=trial_cfg.train.lr * lr_mult)
    run = dataclasses.replace(trial_cfg.run, export=False)
    if kind == "scratch":
        return dataclasses.replace(
            trial_cfg,
            model=dataclasses.replace(trial_cfg.model, pretrained=False),
            strategy=StrategyConfig(name="full"),
            train=train,
            run=run,
        )
    return dataclasses.replace(
        trial_cfg, strategy=StrategyConfig(name="feature_extraction"), train=train, run=run
    )


def _named(cfg: FinetuneConfig, name: str) -> FinetuneConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))


def _write_run(run_dir: Path, cfg: FinetuneConfig, name: str) -> FinetuneConfig:
    cfg = _named(cfg, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return cfg


def retrain_best(
    cfg: FinetuneConfig, space: dict[str, ParamSpec], best: Any, sweep_dir: Path, pools: _Pools
) -> dict[str, Any] | None:
    """The best trial again at the full train.max_steps, into <sweep>/best, when trials
    ran shorter (sweep.max_t) and sweep.retrain_best; its end record (reused when done)."""
    assert cfg.sweep is not None
    if (
        not cfg.sweep.retrain_best
        or space_lib.trial_base(cfg).train.max_steps >= cfg.train.max_steps
    ):
        return None
    run_dir = sweep_dir / "best"
    if _end_record(run_dir) is None:
        full = _write_run(
            run_dir, space_lib.apply(space_lib.full_base(cfg), space, best.params), "best"
        )
        console.print(
            f"graft: retraining trial {best.number} at the full {cfg.train.max_steps} steps -> {run_dir}"
        )
        pools.get().run_all([(str(run_dir), full, run_dir)])
    end = _end_record(run_dir)
    return {**end, "run_dir": str(run_dir)} if end else None


def run_baselines(
    cfg: FinetuneConfig, space: dict[str, ParamSpec], best: Any, sweep_dir: Path, pools: _Pools
) -> dict[str, dict[str, Any]]:
    """Run (or reuse, when finished) the configured baselines on the sweep's gangs, side
    by side: for each kind, one run per lr multiplier (sweep.scratch_lr_mults /
    probe_lr_mults) at the full budget; when the best of those is at an end of the
    grid, the grid grows past that end by its own step, up to sweep.baseline_lr_extend
    runs more (the best trial's lr can be far from what the baseline wants: a head-only
    trial's lr is too large for training every weight from scratch). Returns, per kind,
    the end record of the one best on validation, with ``run_dir`` and ``search``
    (every lr tried) added."""
    sweep = cfg.sweep
    assert sweep is not None
    results: dict[str, dict[str, Any]] = {}
    wanted = baseline_kinds(sweep.baseline)
    for kind in (k for k in wanted if k in zeroshot.KINDS):  # no training: here, in order
        zcfg = space_lib.apply(space_lib.full_base(cfg), space, best.params)
        run_dir = sweep_dir / "baselines" / kind
        end = zeroshot.run(_named(zcfg, kind), kind, run_dir=run_dir)
        results[kind] = {**end, "run_dir": str(run_dir)}
    kinds = [k for k in wanted if k not in zeroshot.KINDS]
    grids = {
        kind: sorted(sweep.scratch_lr_mults if kind == "scratch" else sweep.probe_lr_mults)
        for kind in kinds
    }
    tried: dict[str, dict[float, Path]] = {kind: {} for kind in kinds}
    primary = sweep.objectives[0]
    sign = 1 if primary.mode == "max" else -1
    for round_ in range(sweep.baseline_lr_extend + 1):
        todo = []
        for kind in kinds:
            mults = grids[kind] if round_ == 0 else _extend(grids[kind], tried[kind], primary)
            lrs = []
            for mult in mults:
                bcfg = baseline_config(cfg, space, best.params, kind, mult)
                lrs.append(bcfg.train.lr)
                run_dir = sweep_dir / "baselines" / kind / f"lr_{bcfg.train.lr:.3g}"
                tried[kind][mult] = run_dir
                if _end_record(run_dir) is None:
                    todo.append(
                        (str(run_dir), _write_run(run_dir, bcfg, f"{kind}-{mult:g}"), run_dir)
                    )
            if lrs:
                what = (
                    "settings at lr" if round_ == 0 else "best lr is at the end of the grid; also"
                )
                shown = ", ".join(f"{lr:.3g}" for lr in lrs)
                console.print(f"graft: baseline {kind}: trial {best.number}'s {what} {shown}")
        if todo:
            pools.get().run_all(todo)
        elif round_ > 0:
            break
    for kind in kinds:
        search = _search(tried[kind], primary.metric)
        if search:

            def lr(mult: float, kind: str = kind) -> float:
                return baseline_config(cfg, space, best.params, kind, mult).train.lr

            chosen = max(search, key=lambda r: sign * r[primary.metric])
            results[kind] = {
                **chosen["end"],
                "lr": lr(chosen["mult"]),
                "run_dir": chosen["run_dir"],
                "search": [
                    {
                        "lr": lr(r["mult"]),
                        primary.metric: r[primary.metric],
                        "run_dir": r["run_dir"],
                    }
                    for r in search
                ],
            }
    return results


def _search(tried: dict[float, Path], metric: str) -> list[dict[str, Any]]:
    """The finished runs of one baseline's lr search with a finite ``metric``, by lr."""
    search = []
    for mult, run_dir in sorted(tried.items()):
        end = _end_record(run_dir)
        if end is not None and math.isfinite(end.get(metric, math.nan)):
            search.append({"mult": mult, metric: end[metric], "run_dir": str(run_dir), "end": end})
    return search


def _extend(grid: list[float], tried: dict[float, Path], objective: Any) -> list[float]:
    """One more multiplier past the end of the tried range where the best run is (by the
    grid's own step there), or none when the best is inside the range, a run at that
    end diverged, or the grid has one point."""
    if len(grid) < 2:
        return []
    search = _search(tried, objective.metric)
    if not search:
        return []
    sign = 1 if objective.mode == "max" else -1
    best = max(search, key=lambda r: sign * r[objective.metric])["mult"]
    low, high = min(tried), max(tried)
    if best == low:
        return [low / (grid[1] / grid[0])]
    if best == high:
        return [high * (grid[-1] / grid[-2])]
    return []


def _end_record(run_dir: Path) -> dict[str, Any] | None:
    return next((r for r in reversed(runlog.read(run_dir)) if r.get("event") == "end"), None)


def _test_metrics(end: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (end or {}).items() if k.startswith("test_") and isinstance(v, float)}


MIN_COMPLETE = 3  # fewer complete trials than this: the ranking means little


def summarize(
    cfg: FinetuneConfig,
    best: Any,
    baselines: dict[str, dict[str, Any]],
    *,
    retrained: dict[str, Any] | None = None,
    spent: int | None = None,
    complete: int | None = None,
) -> dict[str, Any]:
    """The sweep's result: the best trial (chosen on validation; its test score only
    reported), its retrained run, the baselines, the transfer gain against scratch on
    validation and, on the held-out split, with a paired-bootstrap 95% interval, and
    the compute spent in full-run equivalents."""
    sweep = cfg.sweep
    assert sweep is not None
    primary = sweep.objectives[0]
    summary: dict[str, Any] = {"metric": primary.metric, "mode": primary.mode, "best": None}
    full_steps = cfg.train.max_steps
    if spent is not None:
        summary["compute"] = {
            "trial_steps": spent,
            "full_run_steps": full_steps,
            "trial_full_runs": spent / full_steps,
            "budget": sweep.budget,
            "retrain_full_runs": 1.0 if retrained else 0.0,
            # (zero- and few-shot scoring trains nothing: no full runs)
            "baseline_full_runs": float(sum(len(b.get("search", [])) for b in baselines.values())),
        }
    if complete is not None and complete < MIN_COMPLETE:
        summary["warning"] = (
            f"only {complete} trial(s) completed: too few for the ranking to mean much "
            f"(raise sweep.num_trials / sweep.budget, or sweep.min_peers)"
        )
    if best is None:
        return summary
    summary["best"] = {"number": best.number, "values": best.values, "params": best.params}
    run_dir = best.user_attrs.get("run_dir")
    end = _end_record(Path(run_dir)) if run_dir else None
    summary["best"]["test"] = _test_metrics(end)
    reference, reference_dir = best.values[0], run_dir
    if retrained is not None:
        summary["retrained"] = {
            primary.metric: retrained.get(primary.metric),
            "step": retrained.get("step"),
            "test": _test_metrics(retrained),
            "run_dir": retrained.get("run_dir"),
        }
        if primary.metric in retrained:  # the baselines train as long as the retrained best
            reference, reference_dir = retrained[primary.metric], retrained.get("run_dir")
    sign = 1 if primary.mode == "max" else -1
    summary["baselines"] = {k: v.get(primary.metric) for k, v in baselines.items()}
    summary["baselines_test"] = {k: _test_metrics(v) for k, v in baselines.items()}
    summary["baselines_lr"] = {k: v.get("lr") for k, v in baselines.items() if "lr" in v}
    summary["baselines_search"] = {k: v["search"] for k, v in baselines.items() if "search" in v}
    scratch = baselines.get("scratch")
    if scratch and primary.metric in scratch:
        gain = sign * (reference - scratch[primary.metric])
        margin = sweep.negative_transfer_margin
        summary["transfer_gain"] = gain
        summary["negative_transfer"] = gain < margin if margin > 0 else gain <= 0
        summary["weak_transfer"] = (
            not summary["negative_transfer"] and gain < sweep.weak_transfer_margin
        )
        summary["margin"] = margin
        summary["weak_margin"] = sweep.weak_transfer_margin
        if reference_dir and scratch.get("run_dir"):
            held_out = bootstrap_gain(
                cfg, Path(reference_dir), Path(scratch["run_dir"]), primary.metric, sign
            )
            if held_out is not None:
                summary["transfer_gain_held_out"] = held_out
    gains = {}
    for kind in zeroshot.KINDS:  # what fine-tuning adds to the model that trains nothing
        ref = baselines.get(kind)
        if ref and primary.metric in ref:
            gains[kind] = {"gain": sign * (reference - ref[primary.metric])}
            if reference_dir and ref.get("run_dir"):
                held_out = bootstrap_gain(
                    cfg, Path(reference_dir), Path(ref["run_dir"]), primary.metric, sign
                )
                if held_out is not None:
                    gains[kind]["held_out"] = held_out
    if gains:
        summary["gain_over_untrained"] = gains
    return summary


def bootstrap_gain(
    cfg: FinetuneConfig,
    run_a: Path,
    run_b: Path,
    metric: str,
    sign: int,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Run a minus run b on the held-out split (test, else validation) they were both
    scored on, example by example: the gain and its paired-bootstrap 95% interval."""
    import torch

    from jobs import tasks
    from jobs.worker import EXAMPLE_SUMS

    for split in ("test", "eval"):
        a_path, b_path = (r / EXAMPLE_SUMS.format(split=split) for r in (run_a, run_b))
        if a_path.is_file() and b_path.is_file():
            break
    else:
        return None
    a, b = torch.load(a_path), torch.load(b_path)
    if a.shape[0] != b.shape[0]:
        return None
    task = tasks.get(cfg.model)
    key = metric.replace("eval_", f"{split}_", 1)

    def score(sums: torch.Tensor, rows: torch.Tensor) -> float:
        return float(task.metrics(sums[rows].sum(0), split)[key])

    everyone = torch.arange(a.shape[0])
    gain = sign * (score(a, everyone) - score(b, everyone))
    generator = torch.Generator().manual_seed(seed)
    draws = sorted(
        sign * (score(a, rows) - score(b, rows))
        for rows in (
            torch.randint(0, a.shape[0], (a.shape[0],), generator=generator)
            for _ in range(resamples)
        )
    )
    low, high = draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]
    return {"split": split, "metric": key, "gain": gain, "ci95": [low, high], "n": int(a.shape[0])}


def describe_summary(summary: dict[str, Any]) -> list[str]:
    """The summary as lines of text (the driver prints them; the report reuses them)."""
    lines = []
    metric = summary["metric"]
    if summary.get("warning"):
        lines.append(f"warning: {summary['warning']}")
    best = summary.get("best")
    if best is None:
        return [*lines, "no trial completed"]
    if best.get("test"):
        lines.append(
            "best trial on the test split: "
            + ", ".join(f"{k} {v:.4g}" for k, v in best["test"].items())
        )
    retrained = summary.get("retrained")
    if retrained and retrained.get(metric) is not None:
        test = ", ".join(f"{k} {v:.4g}" for k, v in retrained["test"].items())
        lines.append(
            f"best retrained at the full {retrained['step']} steps: {metric} {retrained[metric]:.4g}"
            + (f"; test {test}" if test else "")
        )
    for kind, value in summary.get("baselines", {}).items():
        if value is not None:
            lr = summary.get("baselines_lr", {}).get(kind)
            tried = len(summary.get("baselines_search", {}).get(kind, []))
            scores = summary.get("baselines_test", {}).get(kind) or {}
            lines.append(
                f"baseline {kind}: {metric} {value:.4g}"
                + (f" (best of {tried} lrs: {lr:.3g})" if lr is not None else "")
                + (
                    f"; test {', '.join(f'{k} {v:.4g}' for k, v in scores.items())}"
                    if scores
                    else ""
                )
            )
    if "transfer_gain" in summary:
        held = summary.get("transfer_gain_held_out")
        lines.append(
            f"transfer gain (best pretrained - scratch) on {metric}: {summary['transfer_gain']:+.4g}"
            + _held_out_text(held)
        )
        if summary["negative_transfer"]:
            lines.append(
                f"NEGATIVE TRANSFER: the pretrained model does not beat random init by the "
                f"margin {summary['margin']:g} on {metric}"
            )
        elif summary.get("weak_transfer"):
            lines.append(
                f"WEAK TRANSFER: the pretrained model beats random init by less than "
                f"{summary['weak_margin']:g} on {metric}"
            )
    for kind, gain in summary.get("gain_over_untrained", {}).items():
        held = gain.get("held_out")
        lines.append(
            f"fine-tuning gain over {kind} (best - {kind}) on {metric}: {gain['gain']:+.4g}"
            + _held_out_text(held)
        )
    compute = summary.get("compute")
    if compute:
        lines.append(
            f"compute: trials {compute['trial_steps']} steps = {compute['trial_full_runs']:.2f} full runs "
            f"of {compute['full_run_steps']}"
            + (f" (budget {compute['budget']})" if compute.get("budget") else "")
            + f", retrain {compute['retrain_full_runs']:g}, baselines {compute['baseline_full_runs']:g}"
        )
    return lines


def _held_out_text(held: dict[str, Any] | None) -> str:
    if not held:
        return ""
    low, high = held["ci95"]
    return (
        f"; on {held['split']} ({held['n']} examples) {held['metric']} {held['gain']:+.4g}, "
        f"95% CI [{low:+.4g}, {high:+.4g}]"
    )


def _print_summary(summary: dict[str, Any], elapsed: float) -> None:
    best = summary.get("best")
    if best is not None:
        console.print(
            f"graft: best trial {best['number']}: {summary['metric']} {best['values'][0]:.4g} "
            f"({space_lib.describe(best['params'])}); {elapsed:.0f}s"
        )
    for line in describe_summary(summary):
        style = "bold red" if line.startswith(("NEGATIVE", "WEAK", "warning")) else ""
        console.print(f"graft: [{style}]{line}[/{style}]" if style else f"graft: {line}")


# --------------------------------------------------------------------------- entry point
def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf", config_name="sweep", version_base=None)
    def _main(node: DictConfig) -> None:
        run(config_lib.to_plain(node))

    _main()


if __name__ == "__main__":
    main()
