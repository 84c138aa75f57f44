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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conf.schema import ConfigError, FinetuneConfig
from jobs import config as config_lib
from jobs import engine as engine_lib
from jobs import runlog
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


@dataclasses.dataclass
class Summary:
    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None


def debug_knobs() -> dict[str, Any]:
    knobs = {"fail_at_step": FAIL_AT_STEP_ENV, "stop_at_step": STOP_AT_STEP_ENV}
    return {key: int(os.environ[env]) for key, env in knobs.items() if os.environ.get(env)}


def make_trainer(
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    started: float,
    callbacks: Sequence[Any] = (),
    more: Sequence[tuple[FinetuneConfig, Path]] = (),
    serve: dict[str, Any] | None = None,
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
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "runs": [{"cfg": c, "run_dir": str(d)} for c, d in runs],
            "started": started,
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
            failure_config=FailureConfig(max_failures=0),
            callbacks=list(callbacks),
        ),
    )


def gang_bundle(cfg: FinetuneConfig) -> dict[str, float]:
    """The Ray resources of one training worker."""
    bundle: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    return bundle


def _prepare(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Path]:
    """Preflight (every config/model/data error surfaces here, before Ray), the run
    directory and its config.yaml."""
    cfg = config_lib.with_run_name(cfg)
    facts = preflight(cfg)
    assert cfg.run.name is not None
    run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    world = cfg.scaling.num_workers
    print(f"graft: run {cfg.run.name} -> {run_dir}")
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


def run(cfg: FinetuneConfig, *, show_progress: bool = True) -> Summary:
    """Fine-tune as ``cfg`` says. Callable in-process (tests) and from the CLI."""
    return run_many([cfg], show_progress=show_progress)[0]


def run_many(cfgs: Sequence[FinetuneConfig], *, show_progress: bool = True) -> list[Summary]:
    """Fine-tune each config, one after another, in one Train gang (same scaling and
    cluster): the gang's start-up is paid once. Every config is checked before Ray."""
    from cluster.connect import connect
    from jobs.progress import follow

    started = time.time()
    prepared = [_prepare(cfg) for cfg in cfgs]
    first, first_dir = prepared[0]
    cluster = connect(first.cluster, first.scaling)
    print(f"graft: Ray at {cluster['address']}, dashboard {cluster['dashboard']}")
    trainer = make_trainer(first, first_dir, started=started, more=prepared[1:])
    total = sum(cfg.train.max_steps for cfg, _ in prepared)
    with follow(
        first_dir / runlog.METRICS, total_steps=total, enabled=show_progress and len(prepared) == 1
    ):
        trainer.fit()
    summaries = []
    for cfg, run_dir in prepared:
        records = runlog.read(run_dir)
        final: dict[str, Any] = next((r for r in reversed(records) if r.get("event") == "end"), {})
        export_dir = run_dir / "export" if cfg.run.export else None
        print(
            f"graft: done in {time.time() - started:.0f}s ({cfg.run.name}): "
            + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))
        )
        if export_dir:
            print(f"graft: exported to {export_dir}")
        summaries.append(Summary(run_dir=run_dir, metrics=final, export_dir=export_dir))
    return summaries


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
