"""The fine-tuning job: Hydra config -> Ray Train gang -> DeepSpeed ZeRO -> HF export.

    python -m jobs.finetune [hydra overrides]          # same as: graft finetune [...]
    python -m jobs.finetune model=tiny_llama data=jsonl data.path=x.jsonl data.task=instruction \
        strategy=lora deepspeed=zero3 scaling.num_workers=2

Three layers, top to bottom:
  run(cfg)                   the driver: preflight, connect to Ray, TorchTrainer, summary
  jobs.worker                one Ray Train worker: setup -> phases -> finish
  main()                     the thin Hydra entry point
The run directory (runs/<name>/) holds config.yaml, metrics.jsonl, checkpoints/,
export/ and tensorboard/. Rerunning with the same run.name resumes from the latest
complete checkpoint. ``run_many`` trains several configs one after another in one Train
gang (one start-up for all: tests and benchmarks use it).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.connect import STATE_API_ENV
from conf.schema import ConfigError, FinetuneConfig
from jobs import card, preempt, runlog, timeline
from jobs import checkpoint as ckpt
from jobs import config as config_lib
from jobs import engine as engine_lib
from jobs import resume as resume_lib
from jobs.preflight import preflight
from jobs.worker import CHECKPOINTS, State, config_digest, start_engine, train_fn_per_worker

__all__ = [
    "CHECKPOINTS",
    "State",
    "Summary",
    "config_digest",
    "gang_bundle",
    "make_trainer",
    "run",
    "run_many",
    "run_name",
    "start_engine",
    "train_fn_per_worker",
]


def run_name(cfg: FinetuneConfig) -> str:
    """The run's directory name (``run.name`` or derived from the config)."""
    return config_lib.run_name(cfg)


# Test-only fault injection, kept out of the config schema (read on the driver, handed
# to the workers): every worker raises right after this step (its gang dies) ...
FAIL_AT_STEP_ENV = "GRAFT_FAIL_AT_STEP"
# ... or, in a pool's gang, the run stops there as a cancelled one does (its engine torn
# down, its checkpoints left as they are) and the gang takes the next run.
STOP_AT_STEP_ENV = "GRAFT_STOP_AT_STEP"
# ... or every optimizer step takes at least this long (seconds): a tiny model's steps
# made as slow as a real one's, for tests that signal a run between two steps.
STEP_SLEEP_ENV = "GRAFT_STEP_SLEEP_S"


@dataclasses.dataclass
class Summary:
    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None
    # What the run's workers reported to Ray at its end (trainer.fit()'s Result), for the
    # run a gang finished last; {} for the others and for a gang that stopped early.
    reported: dict[str, Any] = dataclasses.field(default_factory=dict)


def debug_knobs() -> dict[str, Any]:
    knobs = {"fail_at_step": FAIL_AT_STEP_ENV, "stop_at_step": STOP_AT_STEP_ENV}
    found: dict[str, Any] = {
        key: int(os.environ[env]) for key, env in knobs.items() if os.environ.get(env)
    }
    if os.environ.get(STEP_SLEEP_ENV):
        found["step_sleep_s"] = float(os.environ[STEP_SLEEP_ENV])
    return found


def max_failures(cfg: FinetuneConfig) -> int:
    """``train.max_failures`` resolved: 1 on a remote cluster, 0 embedded (see the schema)."""
    if cfg.train.max_failures is not None:
        return cfg.train.max_failures
    return 1 if cfg.cluster.address else 0


class RunFailed(RuntimeError):
    """A run's gang failed more often than train.max_failures allows."""


def make_trainer(
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    started: float,
    callbacks: Sequence[Any] = (),
    more: Sequence[tuple[FinetuneConfig, Path]] = (),
    serve: dict[str, Any] | None = None,
    session: str | None = None,
    marks: dict[str, float] | None = None,
) -> Any:
    """The Ray Train gang for one run (``more``: further runs after it, same scaling):
    ``cfg.scaling.num_workers`` DeepSpeed workers. Used by ``run``/``run_many`` and by a
    sweep's pool (``serve``: the gang trains the runs a jobs.pool dispatcher hands out;
    ``run_dir`` then only holds Ray Train's state)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    runs = [] if serve else [(cfg, run_dir), *more]
    for other, _ in runs[1:]:
        if other.scaling != cfg.scaling:
            raise ConfigError(
                "scaling",
                f"runs sharing one gang need the same scaling: {other.scaling} vs {cfg.scaling}",
            )
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "runs": [{"cfg": c, "run_dir": str(d)} for c, d in runs],
            "started": started,
            "session": session,
            "marks": dict(marks or {}),  # the driver's start-up (jobs/timeline.py)
            "debug": debug_knobs(),
            **({"serve": serve} if serve else {}),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.gpus_per_worker > 0,
            resources_per_worker=gang_bundle(cfg),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.gpus_per_worker else "gloo"),
        run_config=RunConfig(
            # Ray Train's own run state; graft's checkpoints are in run_dir/checkpoints.
            name=".train",
            storage_path=str(run_dir),
            # A pool's slot restarts its own gang (jobs.pool), retrying the run it was on.
            failure_config=FailureConfig(max_failures=0 if serve else max_failures(cfg)),
            callbacks=list(callbacks),
        ),
    )
    _lean_callbacks(trainer, state_api=os.environ.get(STATE_API_ENV) != "0")
    if cfg.cluster.address is None:
        _lean_controller(trainer)
        _lean_backend(trainer)
    return trainer


def _lean_backend(trainer: Any) -> None:
    """On graft's embedded cluster, the gang's torch process group is set up through a
    jobs.lean.LeanTorchConfig (Ray Train's TorchConfig without torch in the controller)."""
    from jobs.lean import LeanTorchConfig

    lean = LeanTorchConfig.of(trainer.backend_config)
    trainer.backend_config = lean
    trainer.train_run_context = dataclasses.replace(trainer.train_run_context, backend_config=lean)


def _lean_controller(trainer: Any) -> None:
    """On graft's embedded cluster (fixed size, no autoscaler), the controller runs with
    jobs.lean.NoAutoscalerScalingPolicy instead of Ray Train's FixedScalingPolicy and,
    where its environment is already the raylet's, as a jobs.lean.LeanController
    (``_start_controller``)."""
    from jobs.lean import NoAutoscalerScalingPolicy

    start = trainer._initialize_and_run_controller

    def initialize_and_run(**kwargs: Any) -> Any:
        given = kwargs.get("scaling_policy")
        if given is not None and type(given).__name__ == "FixedScalingPolicy":
            kwargs["scaling_policy"] = NoAutoscalerScalingPolicy(given.scaling_config)
        if controller_env_inherited():
            return _start_controller(trainer, kwargs)
        return start(**kwargs)

    trainer._initialize_and_run_controller = initialize_and_run


def controller_env_inherited() -> bool:
    """Whether the raylet's environment already holds every variable Ray Train would give
    its controller (and the controller its workers) in a runtime env, with this
    process's values: true on the embedded cluster this process started, unless a
    RAY_TRAIN_* variable was set or changed since."""
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        get_env_vars_to_propagate,
    )

    from cluster.connect import raylet_env

    raylet = raylet_env()
    if raylet is None:
        return False
    wanted = get_env_vars_to_propagate()
    wanted.setdefault(
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE
    )
    return all(raylet.get(k) == v for k, v in wanted.items())


def _start_controller(trainer: Any, kwargs: dict[str, Any]) -> Any:
    """What ``DataParallelTrainer._initialize_and_run_controller`` does (the controller
    on the driver's node, Ctrl-C aborts the run), with a LeanController and no runtime
    env: without one, the controller (and the synchronization actor it starts) take
    processes the raylet started at ray.init instead of waiting for new ones, and its
    gang workers inherit the raylet's environment (measured: the first step ~1.3 s
    earlier on 2 cores, three alternating pairs)."""
    import threading

    import ray

    from jobs.lean import LeanController

    node = ray.get_runtime_context().get_node_id()
    on_this_node = {ray._raylet.RAY_NODE_ID_KEY: node}  # type: ignore[attr-defined]
    controller: Any = ray.remote(num_cpus=0, label_selector=on_this_node)(LeanController).remote(
        **kwargs
    )
    if threading.current_thread() is threading.main_thread():
        trainer._register_sigint_handler(controller)
    ray.get(controller.run.remote())
    return ray.get(controller.get_result.remote())


def _lean_callbacks(trainer: Any, *, state_api: bool) -> None:
    """Leave out the Ray Train callbacks that only cost a graft fit:
    - the DatasetsCallback: it starts a DatasetManager actor per fit (~3.5 s of CPU, a
      process of its own) for the Ray Datasets graft never passes (its data is read by
      the workers themselves);
    - where there is no state API (no dashboard), Ray Train's PlacementGroupCleaner (a
      detached actor per fit that removes the gang's placement group if the controller
      dies) asks it whether the controller lives; that never answers, so it cleans
      nothing and holds every fit's end for its 12 s stop timeout (the placement group
      still goes with its job)."""
    unwanted = {"DatasetsCallback"} | (set() if state_api else {"PlacementGroupCleanerCallback"})
    make = trainer._create_default_callbacks

    def defaults() -> list[Any]:
        return [c for c in make() if type(c).__name__ not in unwanted]

    trainer._create_default_callbacks = defaults


def gang_bundle(cfg: FinetuneConfig) -> dict[str, float]:
    """The Ray resources of one training worker."""
    bundle: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    return bundle


def _prepare(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Path]:
    """Everything checked before Ray, nothing written: preflight (every config/model/data
    error), the output directory can be made, and a rerun's config can continue the
    run's checkpoints (jobs.resume). The directory is made by ``_create`` once the
    cluster has the resources."""
    cfg = config_lib.with_run_name(cfg)
    facts = preflight(cfg)
    assert cfg.run.name is not None
    run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    creatable(run_dir, key="run.output_dir")
    try:
        rerun = resume_lib.check_rerun(cfg, run_dir)
    except ckpt.NoUsableCheckpoint as e:
        raise ConfigError("run.name", str(e)) from None
    world = cfg.scaling.num_workers
    print(f"graft: run {cfg.run.name} -> {run_dir}")
    if rerun is not None:
        cfg = rerun.cfg
        print(f"graft: resuming from {rerun.checkpoint} (step {rerun.step})")
    print(
        f"graft: {cfg.model.name} ({facts.num_blocks} blocks), strategy {cfg.strategy.name}, ZeRO-{cfg.deepspeed.stage}, "
        f"{facts.num_train} train / {facts.num_eval} eval"
        + (f" / {facts.num_test} test" if facts.num_test else "")
        + " examples"
        + (f", {len(facts.labels)} labels" if facts.labels else "")
    )
    if len(facts.phases) > 1:
        print(
            "graft: phases "
            + ", ".join(
                f"{p.start_step}-{p.end_step}: {p.trainable_blocks} blocks" for p in facts.phases
            )
        )
    print(f"graft: {engine_lib.describe_batch(cfg.train, world)}; {cfg.train.max_steps} steps")
    return cfg, run_dir


def check_only(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Path]:
    """``graft check``: what a run checks before Ray starts (``_prepare``), nothing
    written; returns the config a run would use and its run directory."""
    return _prepare(cfg)


def creatable(directory: Path, *, key: str) -> None:
    """ConfigError naming ``key`` unless ``directory`` exists as a directory or can be
    made (tried, and what was made removed again: nothing is left behind)."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        for d in reversed(missing):
            d.mkdir()
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        raise ConfigError(
            key, f"cannot create {directory} ({e}); allowed: a directory this user can write"
        ) from None
    finally:
        for d in missing:
            if d.is_dir():
                d.rmdir()


def _create(cfg: FinetuneConfig, run_dir: Path) -> None:
    """The run directory and its config.yaml (after every check passed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    preempt.clear(run_dir)
    (run_dir / resume_lib.CONFIG).write_text(config_lib.to_yaml(cfg))
    card.record_command(run_dir)


def _last_event(run_dir: Path) -> str | None:
    records = runlog.read(run_dir)
    return next((r["event"] for r in reversed(records) if "event" in r), None)


def _last_step(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in runlog.read(run_dir)), default=0)


def _exit_preempted(todo: list[tuple[FinetuneConfig, Path]]) -> None:
    for _, run_dir in todo:
        newest = ckpt.latest_complete(run_dir / CHECKPOINTS)
        print(
            f"graft: preempted (SIGTERM): {run_dir.name} stopped at step {_last_step(run_dir)}, "
            f"checkpoint {newest}; rerun the same command to resume"
        )
    raise SystemExit(preempt.EXIT_CODE)


def _failed(error: Exception, todo: list[tuple[FinetuneConfig, Path]], session: str) -> Exception:
    """The gang failed for good: how often, and where its checkpoints are."""
    cfg, run_dir = todo[0]
    for c, d in todo:  # the run it failed in: the first one not finished
        if _last_event(d) != "end":
            cfg, run_dir = c, d
            break
    restarts = [
        r
        for r in runlog.read(run_dir)
        if r.get("event") == "failure" and r.get("session") == session
    ]
    newest = ckpt.latest_complete(run_dir / CHECKPOINTS)
    text = str(error).strip().splitlines()
    return RunFailed(
        f"run {run_dir.name} failed {len(restarts) + 1} time(s) (train.max_failures="
        f"{max_failures(cfg)}); its checkpoints are in {run_dir / CHECKPOINTS} (newest "
        f"complete: {newest.name if newest else 'none'}): rerun the same command to resume "
        "from there. The last error:\n" + "\n".join(text[-30:])
    )


def run(cfg: FinetuneConfig, *, show_progress: bool = True) -> Summary:
    """Fine-tune as ``cfg`` says. Callable in-process (tests) and from the CLI."""
    return run_many([cfg], show_progress=show_progress)[0]


def run_many(cfgs: Sequence[FinetuneConfig], *, show_progress: bool = True) -> list[Summary]:
    """Fine-tune each config, one after another, in one Train gang (same scaling and
    cluster): the gang's start-up is paid once. Every config is checked before Ray."""
    from cluster.connect import TRAINER_MODULES, connect, describe, join_local, join_message
    from jobs.progress import follow

    started = timeline.COMMAND_STARTED or time.time()
    marks = timeline.Marks()
    prepared = [_prepare(cfg) for cfg in cfgs]
    marks.mark("preflight")
    first, first_dir = prepared[0]
    if address := join_local(first.cluster):
        print(join_message(address))
        for cfg, _ in prepared:
            cfg.cluster.address = address
    cluster = connect(first.cluster, first.scaling, meanwhile=TRAINER_MODULES)
    marks.mark("ray")
    print(describe(cluster))
    for cfg, run_dir in prepared:
        _create(cfg, run_dir)
    total = sum(cfg.train.max_steps for cfg, _ in prepared)
    preempted_at: dict[Path, int] = {}
    reported: dict[Path, dict[str, Any]] = {}
    todo = list(prepared)
    with preempt.on_driver_sigterm([d for _, d in prepared]) as driver:
        while todo:
            (head, head_dir), rest = todo[0], todo[1:]
            # One session per fit: a second start in it is Ray Train's restart after a
            # failure (a preempted gang's successor is a new fit, a new session).
            session = uuid.uuid4().hex[:12]
            marks.mark("trainer")
            trainer = make_trainer(
                head, head_dir, started=started, more=rest, session=session, marks=marks.at
            )
            with follow(
                head_dir / runlog.METRICS,
                total_steps=total,
                enabled=show_progress and len(prepared) == 1,
            ):
                try:
                    result = trainer.fit()
                except Exception as e:
                    raise _failed(e, todo, session) from e
            # The gang's last report is the final one of the last run it trained: it
            # reaches the driver through Ray, also from a cluster that shares no storage
            # with it (where metrics.jsonl is not readable here).
            metrics = dict(getattr(result, "metrics", None) or {})
            if metrics.get("final") == 1:
                reported[todo[-1][1]] = metrics
            todo = [(c, d) for c, d in todo if _last_event(d) != "end" and d not in reported]
            if driver["signalled"] and todo:
                _exit_preempted(todo)
            for _, run_dir in todo:  # a worker's SIGTERM: it checkpointed; a fresh gang goes on
                if _last_event(run_dir) != "preempted":
                    continue
                step = _last_step(run_dir)
                if preempted_at.get(run_dir) == step:
                    raise RunFailed(
                        f"run {run_dir.name} was preempted twice at step {step} without "
                        f"progress; its checkpoints are in {run_dir / CHECKPOINTS}: rerun to resume"
                    )
                preempted_at[run_dir] = step
                print(f"graft: {run_dir.name} preempted at step {step}; restarting its gang")
    summaries = []
    for cfg, run_dir in prepared:
        records = runlog.read(run_dir)
        final: dict[str, Any] = next((r for r in reversed(records) if r.get("event") == "end"), {})
        if not final and run_dir in reported:  # no shared storage: Ray's copy of the result
            final = {
                k: v for k, v in reported[run_dir].items() if k not in ("final", "evals", "step")
            }
        export_dir = run_dir / "export" if cfg.run.export else None
        print(
            f"graft: done in {time.time() - started:.0f}s ({cfg.run.name}): "
            + ", ".join(
                f"{k}={v:.4g}"
                for k, v in final.items()
                if isinstance(v, float) and k not in runlog.BOOKKEEPING
            )
        )
        _confusion_summary(final, run_dir)
        if export_dir:
            print(f"graft: exported to {export_dir}")
        summaries.append(
            Summary(
                run_dir=run_dir,
                metrics=final,
                export_dir=export_dir,
                reported=reported.get(run_dir, {}),
            )
        )
    return summaries


def _confusion_summary(final: dict[str, Any], run_dir: Path) -> None:
    """A classifier's per-class precision/recall on its test split (else validation),
    printed, and its confusion matrix as ``confusion_<split>.png`` in the run directory."""
    from jobs import report

    found = report.confusion_of(final)
    if found is None:
        return
    split, matrix, labels = found
    name = "test" if split == "test" else "validation"
    rows = report.per_class(matrix, labels)
    print(
        f"graft: per class ({name}): "
        + ", ".join(
            f"{label} P={r['precision']:.2f} R={r['recall']:.2f} n={r['support']}"
            for label, r in rows.items()
        )
    )
    try:
        path = run_dir / f"confusion_{split}.png"
        report.plot_confusion(matrix, labels, f"{run_dir.name}: {name} split", path)
        print(f"graft: confusion matrix -> {path}")
    except OSError as e:  # a driver without the run directory's storage
        print(f"graft: confusion matrix not written ({e})")


# --------------------------------------------------------------------------- entry point
def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf", config_name="finetune", version_base=None)
    def _main(node: DictConfig) -> None:
        run(config_lib.to_plain(node))

    _main()


if __name__ == "__main__":
    main()
