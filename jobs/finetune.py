"""The fine-tuning job: Hydra config -> Ray Train gang -> DeepSpeed ZeRO -> HF export.

    python -m jobs.finetune [hydra overrides]          # same as: graft finetune [...]
    python -m jobs.finetune model=tiny_llama data=jsonl data.path=x.jsonl data.task=instruction \
        strategy=lora deepspeed=zero3 scaling.num_workers=2

Three layers, top to bottom:
  run(cfg)                   the driver: preflight, connect to Ray, TorchTrainer, summary
  train_fn_per_worker(...)   one Ray Train worker: model, strategy, DeepSpeed, loop, export
  main()                     the thin Hydra entry point
The run directory (runs/<name>/) holds config.yaml, metrics.jsonl, checkpoints/,
export/ and tensorboard/. Rerunning with the same run.name resumes from the latest
complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from conf.schema import FinetuneConfig, StrategyConfig
from jobs import checkpoint as ckpt
from jobs import config as config_lib
from jobs import data as data_lib
from jobs import engine as engine_lib
from jobs import runlog, strategies
from jobs.evaluate import evaluate
from jobs.export import export
from jobs.models import Layout, build, hidden_size
from jobs.preflight import preflight
from jobs.strategies.discriminative import param_groups

CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Summary:
    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None


def make_trainer(
    cfg: FinetuneConfig, run_dir: Path, *, started: float, callbacks: Sequence[Any] = ()
) -> Any:
    """The Ray Train gang for one run: ``cfg.scaling.num_workers`` DeepSpeed workers, its
    checkpoints under ``run_dir/checkpoints`` (so the same run_dir resumes). Used by
    ``run`` and by each sweep trial (which adds Tune's report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    early = cfg.train.early_stopping
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "started": started},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.gpus_per_worker > 0,
            resources_per_worker=gang_bundle(cfg),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.gpus_per_worker else "gloo"),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=early.metric if early.enabled else None,
                checkpoint_score_order="max" if early.mode == "max" else "min",
            ),
            callbacks=list(callbacks),
        ),
    )


def gang_bundle(cfg: FinetuneConfig) -> dict[str, float]:
    """The Ray resources of one training worker."""
    bundle: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    return bundle


def run(cfg: FinetuneConfig, *, show_progress: bool = True) -> Summary:
    """Fine-tune as ``cfg`` says. Callable in-process (tests) and from the CLI."""
    from cluster.connect import connect
    from jobs.progress import follow

    started = time.time()
    cfg = config_lib.with_run_name(cfg)
    facts = preflight(cfg)  # every config/model/data error surfaces here, before Ray
    assert cfg.run.name is not None
    run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

    world = cfg.scaling.num_workers
    print(f"graft: run {cfg.run.name} -> {run_dir}")
    print(
        f"graft: {cfg.model.name} ({facts.num_blocks} blocks), strategy {cfg.strategy.name}, ZeRO-{cfg.deepspeed.stage}, "
        f"{facts.num_train} train / {facts.num_eval} eval examples"
        + (f", {len(facts.labels)} labels" if facts.labels else "")
    )
    print(f"graft: {engine_lib.describe_batch(cfg.train, world)}; {cfg.train.max_steps} steps")

    cluster = connect(cfg.cluster, cfg.scaling)
    print(f"graft: Ray at {cluster['address']}, dashboard {cluster['dashboard']}")

    trainer = make_trainer(cfg, run_dir, started=started)
    with follow(run_dir / runlog.METRICS, total_steps=cfg.train.max_steps, enabled=show_progress):
        trainer.fit()

    records = runlog.read(run_dir)
    final: dict[str, Any] = next((r for r in reversed(records) if r.get("event") == "end"), {})
    export_dir = run_dir / "export" if cfg.run.export else None
    print(
        f"graft: done in {time.time() - started:.0f}s: "
        + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))
    )
    if export_dir:
        print(f"graft: exported to {export_dir}")
    return Summary(run_dir=run_dir, metrics=final, export_dir=export_dir)


# --------------------------------------------------------------------------- worker
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@dataclasses.dataclass
class State:
    """What a checkpoint restores besides DeepSpeed's own state."""

    step: int = 0
    micro_step: int = 0
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    # Wall time spent training, summed over sessions (a resumed run keeps counting).
    train_time_s: float = 0.0


def _resume_point(storage: Any) -> Path | None:
    """The latest complete checkpoint: Ray's latest if its commit markers are all there,
    else the newest complete one on disk (a half-written checkpoint is never loaded)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is not None and ckpt.is_complete(Path(latest.path)):
        return Path(latest.path)
    return ckpt.latest_complete(Path(storage.experiment_fs_path))


def _all_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return float(t.item())


def config_digest(cfg: FinetuneConfig) -> str:
    """A short hash of the config a worker trains with (sweep trials check all ranks agree)."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ranks_agree(digest: str) -> bool:
    if not torch.distributed.is_initialized():
        return True
    mine = torch.tensor([int(digest, 16) & (2**62 - 1)], dtype=torch.int64)
    low, high = mine.clone(), mine.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(low.item() == high.item())


def _improved(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclasses.dataclass
class PhaseEngine:
    engine: Any
    group_names: list[str]
    trainable: int
    total: int


def start_engine(
    model: torch.nn.Module,
    strategy: StrategyConfig,
    cfg: FinetuneConfig,
    layout: Layout,
    *,
    world: int,
    width: int,
) -> PhaseEngine:
    """Apply a phase's strategy, group the trainable parameters (discriminative lrs) and
    start its DeepSpeed engine. The worker's path; ``jobs.memprobe`` measures this too."""
    import deepspeed

    train = cfg.train
    model = strategies.apply(model, strategy, layout)
    groups = param_groups(
        model,
        layout,
        lr=train.lr,
        lr_ratio=strategy.lr_ratio,
        head_lr_mult=strategy.head_lr_mult,
        weight_decay=train.weight_decay,
    )
    # Counted before DeepSpeed: under ZeRO-3 each rank's tensors are [0] afterwards.
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=engine_lib.optimizer(groups, train),
        lr_scheduler=lambda opt: engine_lib.scheduler(opt, train),
        config=engine_lib.deepspeed_config(
            cfg.deepspeed, train, world_size=world, hidden_size=width
        ),
        dist_init_required=False,
    )
    return PhaseEngine(engine, [g["name"] for g in groups], trainable, total)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker. ``loop_config["cfg"]`` is the plain, validated dataclass."""
    import ray.train

    _quiet()
    cfg: FinetuneConfig = loop_config["cfg"]
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = cfg.train
    torch.manual_seed(train.seed)

    dataset = data_lib.load(cfg.data)
    model: torch.nn.Module
    model, tokenizer = build(cfg.model, labels=dataset.labels, seed=train.seed)
    layout = Layout.of(model.config)
    width = hidden_size(model.config)
    train_set = data_lib.encode(dataset.train, tokenizer, cfg.data, dataset.labels)
    eval_set = data_lib.encode(dataset.eval, tokenizer, cfg.data, dataset.labels)
    pad_id = tokenizer.pad_token_id
    eval_batches = data_lib.eval_batches(
        eval_set,
        rank=rank,
        world_size=world,
        micro_batch_size=train.micro_batch_size,
        pad_id=pad_id,
    )
    per_epoch = data_lib.micro_batches_per_epoch(
        len(train_set), world_size=world, micro_batch_size=train.micro_batch_size
    )
    max_micro_steps = per_epoch * train.max_epochs if train.max_epochs else None

    log = runlog.RunLog(run_dir, enabled=rank == 0)
    digest = config_digest(cfg)
    if not _ranks_agree(digest):
        raise RuntimeError(f"rank {rank}: the workers were given different configs")
    state = State()
    resume_from = _resume_point(context.get_storage())
    if resume_from is None:
        log.reset()
    early = train.early_stopping
    stopped_early = False

    engine: Any = None
    for phase in strategies.phases(cfg.strategy, train.max_steps):
        started = start_engine(model, phase.strategy, cfg, layout, world=world, width=width)
        engine, trainable, total = started.engine, started.trainable, started.total
        group_names = started.group_names
        if resume_from is not None and state.step == 0:
            state = State(**ckpt.load(engine, resume_from, rank=rank, world_size=world))
            log.truncate_after(state.step)
            log.log({"event": "resume", "step": state.step, "checkpoint": str(resume_from)})
        if state.step == 0:
            log.log(
                {
                    "event": "start",
                    "step": 0,
                    "phase": phase.name,
                    "world_size": world,
                    "trainable_params": trainable,
                    "total_params": total,
                    "global_batch": engine_lib.global_batch_size(train, world),
                    "config_digest": digest,
                    "lr": dict(zip(group_names, engine.lr_scheduler.get_last_lr(), strict=True)),
                }
            )
            if train.eval_at_start:
                engine.eval()
                log.log({"event": "baseline", "step": 0, **evaluate(engine, eval_batches)})

        batches = data_lib.train_batches(
            train_set,
            rank=rank,
            world_size=world,
            seed=train.seed,
            micro_batch_size=train.micro_batch_size,
            pad_id=pad_id,
            start_micro_step=state.micro_step,
        )
        engine.train()
        window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.time()
        clock = time.time()
        while state.step < phase.end_step and not stopped_early:
            if max_micro_steps is not None and state.micro_step >= max_micro_steps:
                break
            batch = next(batches)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            state.micro_step += 1
            window_loss += loss.item()
            window_micro += 1
            window_tokens += int(batch["attention_mask"].sum())
            if state.micro_step % train.grad_accum_steps:
                continue
            state.step += 1
            last = state.step == phase.end_step or (
                max_micro_steps is not None and state.micro_step >= max_micro_steps
            )
            record: dict[str, Any] = {}

            if state.step % train.log_every == 0 or last or state.step == 1:
                elapsed = time.time() - window_start
                record.update(
                    {
                        "loss": _all_mean(window_loss / window_micro),
                        "lr": dict(
                            zip(group_names, engine.lr_scheduler.get_last_lr(), strict=True)
                        ),
                        "tokens_per_s": _all_mean(window_tokens / elapsed) * world,
                        "steps_per_s": window_micro / train.grad_accum_steps / elapsed,
                        "epoch": state.micro_step / per_epoch,
                    }
                )
                if state.step == 1:
                    record["time_to_first_step_s"] = time.time() - loop_config["started"]
                window_loss, window_micro, window_tokens, window_start = 0.0, 0, 0, time.time()

            save = state.step % train.checkpoint_every == 0 or last
            if state.step % train.eval_every == 0 or last:
                engine.eval()
                record.update(evaluate(engine, eval_batches))
                engine.train()
                value = record[early.metric]
                if _improved(value, state.best, mode=early.mode, min_delta=early.min_delta):
                    state.best, state.best_step, state.evals_without_improvement = (
                        value,
                        state.step,
                        0,
                    )
                    save = save or early.enabled  # the best weights must be on disk to export them
                else:
                    state.evals_without_improvement += 1
                    stopped_early = (
                        early.enabled and state.evals_without_improvement >= early.patience
                    )

            if record:
                log.log({"step": state.step, **record})
            # Ray's controller drains reports on its health-check tick (2 s by default), so
            # report only evals and checkpoints, not every logged step.
            if save or stopped_early or "eval_loss" in record:
                state.train_time_s += time.time() - clock
                clock = time.time()
                record["evals"] = math.ceil(state.step / train.eval_every)
                _report(engine, record, state, save=save or stopped_early, rank=rank, world=world)
            if train.fail_at_step is not None and state.step == train.fail_at_step:
                raise RuntimeError(f"train.fail_at_step={train.fail_at_step}: injected failure")

    assert engine is not None
    if early.enabled and state.best_step is not None and state.best_step != state.step:
        best_dir = Path(
            context.get_storage().build_checkpoint_path_from_name(ckpt.dir_name(state.best_step))
        )
        ckpt.load(engine, best_dir, rank=rank, world_size=world)
    engine.eval()
    final: dict[str, Any] = {
        **evaluate(engine, eval_batches),
        "trainable_params": trainable,
        "train_time_s": state.train_time_s,
    }
    log.log(
        {
            "event": "end",
            "step": state.step,
            "stopped_early": stopped_early,
            "best_step": state.best_step,
            **final,
        }
    )
    if cfg.run.export:
        export(engine, tokenizer, cfg, run_dir / "export", labels=dataset.labels)
    log.close()
    # The run's result, also when a rerun found it already finished: a sweep trial's
    # objective values come from this report ("final" tells a finished trial from a pruned one).
    ray.train.report(
        {**final, "step": state.step, "evals": math.ceil(state.step / train.eval_every), "final": 1}
    )


def _report(
    engine: Any, metrics: dict[str, Any], state: State, *, save: bool, rank: int, world: int
) -> None:
    """ray.train.report on every rank (it is a barrier), with a checkpoint when ``save``."""
    import ray.train

    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    flat["step"] = state.step
    if not save:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory(prefix="graft-ckpt-") as tmp:
        ckpt.save(engine, Path(tmp), rank=rank, world_size=world, state=dataclasses.asdict(state))
        ray.train.report(
            flat,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=ckpt.dir_name(state.step),
        )


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
