"""The per-worker loop of `graft finetune`: one Ray Train worker, one DeepSpeed rank.

    (run by jobs.finetune.make_trainer; see jobs/finetune.py for the command line)

Reads top to bottom as

    setup(cfg)                         data, task, model, loss terms, resume point
    for phase in strategy phases:      one for most strategies, several for progressive
        start_phase(...)               the phase's trainable set, param groups, engine
                                       (built from the previous phase's weights)
        train_phase(...)               micro steps, logs, evals, checkpoints, early stop
    finish(...)                        best weights back, final + test eval, export

Checkpoints go straight to ``<run>/checkpoints/step_N`` (DeepSpeed shards per rank,
then a commit marker per rank), on storage every worker sees; a rerun resumes from the
newest complete one, in the phase that wrote it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from conf.schema import FinetuneConfig, StrategyConfig
from jobs import checkpoint as ckpt
from jobs import data as data_lib
from jobs import engine as engine_lib
from jobs import memory, norms, objectives, preempt, runlog, strategies, tasks, timeline
from jobs.data import cache as token_cache
from jobs.evaluate import evaluate
from jobs.export import export
from jobs.models import Layout, build, hidden_size
from jobs.models import pad_id as models_pad_id
from jobs.pool import Cancelled
from jobs.strategies import Phase
from jobs.strategies.discriminative import merge_alike, param_groups

CHECKPOINTS = "checkpoints"
# Test-only (jobs.finetune.STEP_SLEEP_ENV): the least time an optimizer step takes.
_STEP_SLEEP_S = 0.0
# The events that begin a session of a run (a second one in a session: a restart).
STARTS = ("start", "resume")


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the runs in ``loop_config["runs"]`` one after another (each a
    plain, validated FinetuneConfig and its run directory), or, in a pool's gang
    (``loop_config["serve"]``), the runs its dispatcher hands out until it closes."""
    import ray.train

    marks = timeline.Marks(loop_config.get("marks"))
    marks.mark("worker_process", timeline.process_started())
    marks.mark("train_fn")
    _quiet()
    memory.freeze_imports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    debug = loop_config.get("debug", {})
    global _STEP_SLEEP_S
    _STEP_SLEEP_S = float(debug.get("step_sleep_s", 0.0))
    preempt.install_in_this_worker()
    if "serve" in loop_config:
        serve(loop_config["serve"], rank=rank, world=world)
        return
    for job in loop_config["runs"]:
        try:
            train_one(
                job["cfg"],
                Path(job["run_dir"]),
                rank=rank,
                world=world,
                started=job.get("started", loop_config["started"]),
                fail_at_step=debug.get("fail_at_step"),
                session=loop_config.get("session"),
                marks=marks,
            )
        except preempt.Preempted:
            return  # checkpointed: the driver restarts the gang, or exits (its own SIGTERM)


def serve(spec: dict[str, Any], *, rank: int, world: int) -> None:
    """A pool gang's loop (jobs.pool): take the slot's next job, train it, say how it
    ended; a cancelled run stops at a report, its engine torn down, on every rank."""
    import ray

    dispatcher, slot = spec["dispatcher"], spec["slot"]
    seq = 0
    global _STEP_SLEEP_S
    while (job := ray.get(dispatcher.take.remote(slot, seq))) is not None:
        seq += 1
        outcome = "complete"
        _STEP_SLEEP_S = float(job.get("step_sleep_s", 0.0))  # (test-only, per submission)
        try:
            train_one(
                job["cfg"],
                Path(job["run_dir"]),
                rank=rank,
                world=world,
                started=job["started"],
                fail_at_step=job.get("fail_at_step"),
                stop_at_step=job.get("stop_at_step"),
                report=_PoolReport(dispatcher, job["run_id"], rank),
                session=f"{job['run_id']}@{job['started']}",
            )
        except Cancelled:
            outcome = "cancelled"
        except preempt.Preempted:
            outcome = "preempted"
        gc.collect()
        if rank == 0:
            ray.get(dispatcher.done.remote(slot, job["run_id"], outcome))
        if outcome == "preempted":
            return  # this gang's fit ends (a worker is going away); the slot starts another


class _PoolReport:
    """A pool run's reports go to its dispatcher (rank 0 sends them); at each one the
    ranks agree whether the run was cancelled."""

    def __init__(self, dispatcher: Any, run_id: str, rank: int) -> None:
        self.dispatcher, self.run_id, self.rank = dispatcher, run_id, rank
        self.pending: Any = None  # rank 0's is_cancelled question in flight

    def __call__(self, metrics: dict[str, Any], *, final: bool = False) -> None:
        import ray

        cancelled = 0
        if self.rank == 0:
            ray.get(self.dispatcher.report.remote(self.run_id, metrics))
            if not final:
                cancelled = int(ray.get(self.dispatcher.is_cancelled.remote(self.run_id)))
        if not final and _all_max(cancelled):
            raise Cancelled(self.run_id)

    def poll(self) -> None:
        """After every optimizer step: a cancellation that arrived since (rank 0 keeps one
        question in flight and never waits for it) stops the run here, not at its next
        report, so a pruned trial frees its gang within a step."""
        import ray

        cancelled = 0
        if self.rank == 0:
            if self.pending is None:
                self.pending = self.dispatcher.is_cancelled.remote(self.run_id)
            ready, _ = ray.wait([self.pending], timeout=0)
            if ready:
                cancelled, self.pending = int(ray.get(self.pending)), None
        if _all_max(cancelled):
            raise Cancelled(self.run_id)


def _train_report(metrics: dict[str, Any], *, final: bool = False) -> None:
    """Metrics to Ray. The final one goes with a one-file checkpoint from rank 0: Ray
    Train's Result carries the metrics of its latest checkpoint, so this is how the
    driver gets the run's result through Ray (and its storage), also where it cannot
    read the run directory. graft resumes from its own checkpoints, never from Ray's."""
    import tempfile

    import ray.train

    if not final:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="graft-result-") as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / "result.json").write_text(json.dumps(metrics, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


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
    # The phase (index) whose engine wrote the checkpoint: a resume rebuilds that one.
    phase: int = 0
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    # Wall time spent training, summed over sessions (a resumed run keeps counting).
    train_time_s: float = 0.0
    stopped_early: bool = False


@dataclasses.dataclass
class Run:
    """Everything one run's phases share (built once by ``setup``)."""

    cfg: FinetuneConfig
    run_dir: Path
    rank: int
    world: int
    started: float
    task: Any
    dataset: data_lib.Dataset
    tokenizer: Any
    model: torch.nn.Module  # as built: the first phase starts from it
    layout: Layout
    width: int
    train_set: list[dict[str, Any]]
    eval_batches: list[Any]
    test_batches: list[Any]
    source_batches: list[Any]  # the forgetting probe's (eval.source_path); [] without
    extra_evals: dict[str, list[Any]]  # scored at every evaluation, by metric prefix
    per_epoch: int
    max_micro_steps: int | None
    phases: list[Phase]
    log: runlog.RunLog
    digest: str
    resume_from: Path | None
    fail_at_step: int | None = None
    stop_at_step: int | None = None  # (a pool's run: stops there as if cancelled)
    session: str | None = None  # (train_one's)
    pids: list[int] = dataclasses.field(default_factory=list)  # each rank's process
    marks: timeline.Marks = dataclasses.field(default_factory=timeline.Marks)  # start-up
    # Where reports go (ray.train.report, or a pool's dispatcher), and what runs after
    # every optimizer step (a pool run's cancellation check): see train_one.
    report: Any = None
    poll: Any = None
    # The phase's engine; start_phase replaces it (only this reference holds it, so
    # tearing it down frees its memory).
    current: PhaseEngine | None = None
    streams: list[Stream] = dataclasses.field(default_factory=list)
    # (term, task) -> the jobs.tasks task that scores it and its evaluation batches
    # (multi-task: each scored by its own head)
    task_evals: dict[tuple[str, str], tuple[Any, list[Any]]] = dataclasses.field(
        default_factory=dict
    )
    final_eval: FinalEval | None = None


@dataclasses.dataclass
class FinalEval:
    """The evaluation at a run's last step, with what ``finish`` reports of it."""

    step: int
    scores: dict[str, Any]  # with eval_confusion
    examples: list[torch.Tensor]  # per-example sums (validation; [] with a test split)


@dataclasses.dataclass
class Stream:
    """A loss term's own training data (jobs.objectives), encoded: one micro batch of it
    joins every training micro batch under the term's name."""

    name: str
    encoded: list[dict[str, Any]]
    collate: Any  # its examples into a batch


@dataclasses.dataclass
class PhaseEngine:
    engine: Any
    group_names: list[list[str]]  # per optimizer group, the parameter groups it holds
    trainable: int
    total: int

    def lrs(self) -> dict[str, float]:
        """Every parameter group's current lr, by name."""
        current = self.engine.lr_scheduler.get_last_lr()
        return {
            name: lr for names, lr in zip(self.group_names, current, strict=True) for name in names
        }


def train_one(
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    rank: int,
    world: int,
    started: float,
    fail_at_step: int | None = None,
    stop_at_step: int | None = None,
    report: Any = None,
    session: str | None = None,
    marks: timeline.Marks | None = None,
) -> None:
    """One run, start (or resume) to finish. ``report(metrics, final=)`` receives each
    evaluation/checkpoint report (default: ``ray.train.report``); it may raise to stop
    the run (a pool's cancellation), which tears the run's engine down first.
    ``session``: the driver's attempt at the run (a fit, or a pool submission): a
    second start in one session is a restart after a failure, logged as one."""
    run = setup(
        cfg,
        run_dir,
        rank=rank,
        world=world,
        started=started,
        fail_at_step=fail_at_step,
        session=session,
        marks=marks,
    )
    run.stop_at_step = stop_at_step
    run.report = report or _train_report
    run.poll = getattr(report, "poll", None) or (lambda: None)
    state = State()
    if run.resume_from is not None:
        state = State(**ckpt.read_state(run.resume_from))
    try:
        for phase in run.phases[state.phase :]:
            start_phase(run, phase, state)
            assert run.current is not None
            train_phase(run, phase, run.current, state)
            if state.stopped_early or _epochs_done(run, state):
                break
    except (Cancelled, preempt.Preempted) as stop:  # the gang lives on: free what it holds
        if isinstance(stop, Cancelled):
            run.log.log({"event": "cancelled", "step": state.step, "phase": state.phase})
        run.log.close()
        if run.current is not None:
            run.current.engine.destroy()
            run.current = None
        raise
    assert run.current is not None
    finish(run, run.current, state)


# --------------------------------------------------------------------------- setup
def setup(
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    rank: int,
    world: int,
    started: float,
    fail_at_step: int | None = None,
    session: str | None = None,
    marks: timeline.Marks | None = None,
) -> Run:
    train = cfg.train
    marks = marks or timeline.Marks()
    torch.manual_seed(train.seed)
    task = tasks.get(cfg.model)
    dataset = data_lib.load(cfg.data, task)
    marks.mark("data_read")
    model, tokenizer = build(cfg.model, labels=dataset.labels, seed=train.seed)
    marks.mark("model")
    layout = Layout.of(model.config)
    pad_id = models_pad_id(tokenizer)

    def shard(encoded: list[dict[str, Any]], collate: Any = task.collate) -> list[Any]:
        return data_lib.eval_batches(
            encoded,
            rank=rank,
            world_size=world,
            micro_batch_size=train.micro_batch_size,
            pad_id=pad_id,
            collate_fn=collate,
        )

    def batches(records: list[dict[str, str]], data: Any = cfg.data) -> list[Any]:
        return shard(token_cache.encode(task, records, tokenizer, data, dataset.labels))

    # The forgetting probe's data (eval.source_path), in the run's format or plain text.
    source = None
    if cfg.eval.source_path:
        source = data_lib.read_extra(
            cfg.eval.source_path, cfg.data, task, key="eval.source_path", labels=dataset.labels
        )
    train_set = token_cache.encode(task, dataset.train, tokenizer, cfg.data, dataset.labels)
    marks.mark("data_encoded")
    per_epoch = data_lib.micro_batches_per_epoch(
        len(train_set), world_size=world, micro_batch_size=train.micro_batch_size
    )
    # Loss terms with their own data (DANN's target domain): encoded once, streamed per phase.
    terms: list[Any] = objectives.build(cfg.objectives)
    streams = [
        Stream(t.name, t.encode(t.stream_records(cfg.data), tokenizer, cfg.data), t.collate)
        for t in terms
        if hasattr(t, "stream_records")
    ]
    # Multi-task: a stream per extra task, and each task's held-out part for evaluation.
    task_evals: dict[tuple[str, str], tuple[Any, list[Any]]] = {}
    for t in (t for t in terms if hasattr(t, "task_streams")):
        for name, encoded in t.task_streams(cfg.data, tokenizer).items():
            streams.append(Stream(f"{t.name}/{name}", encoded, t.task_kind(name).collate))
        for name, encoded in t.task_evals(cfg.data, tokenizer).items():
            task_evals[(t.name, name)] = (
                t.task_kind(name),
                shard(encoded, t.task_kind(name).collate),
            )
    digest = config_digest(cfg)
    if not _ranks_agree(digest):
        raise RuntimeError(f"rank {rank}: the workers were given different configs")
    pids: list[Any] = [os.getpid()]
    if torch.distributed.is_initialized() and world > 1:
        pids = [None] * world
        torch.distributed.all_gather_object(pids, os.getpid())
    log = runlog.RunLog(run_dir, enabled=rank == 0, cfg=cfg)
    before = runlog.read(run_dir) if rank == 0 and session else []
    resume_from = _usable_checkpoint(run_dir / CHECKPOINTS, rank=rank, world=world, log=log)
    if resume_from is None:
        log.reset()
    starts = [r for r in before if r.get("session") == session and r.get("event") in STARTS]
    if starts:  # this session started the run before: its gang died, this is the restart
        log.log(
            {
                "event": "failure",
                "attempt": len(starts),
                "session": session,
                "last_logged_step": max((r.get("step", 0) for r in before), default=0),
                "restart_from": str(resume_from) if resume_from else None,
            }
        )
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        rank=rank,
        world=world,
        started=started,
        task=task,
        dataset=dataset,
        tokenizer=tokenizer,
        model=model,
        layout=layout,
        width=hidden_size(model.config),
        train_set=train_set,
        eval_batches=batches(dataset.eval),
        test_batches=batches(dataset.test) if dataset.test else [],
        source_batches=batches(*source) if source else [],
        extra_evals={
            prefix: batches(records)
            for t in terms
            if hasattr(t, "eval_sets")
            for prefix, records in t.eval_sets(cfg.data, task, dataset.labels).items()
        },
        per_epoch=per_epoch,
        max_micro_steps=per_epoch * train.max_epochs if train.max_epochs else None,
        phases=strategies.phases(
            cfg.strategy, max_steps=train.max_steps, num_blocks=layout.num_blocks
        ),
        log=log,
        digest=digest,
        resume_from=resume_from,
        session=session,
        pids=pids,
        fail_at_step=fail_at_step,
        streams=streams,
        task_evals=task_evals,
        marks=marks,
    )


def _usable_checkpoint(parent: Path, *, rank: int, world: int, log: runlog.RunLog) -> Path | None:
    """The newest complete checkpoint whose every file has its recorded size and
    checksum (each rank hashes its share; all agree), the damaged ones skipped with a
    warning in the log naming their files; none usable among complete ones: fail."""
    found, damaged = ckpt.complete(parent), []
    for candidate in found:
        mine = ckpt.problems(candidate, full=True, share=(rank, world))
        wrong: list[Any] = [mine]
        if torch.distributed.is_initialized() and world > 1:
            wrong = [None] * world
            torch.distributed.all_gather_object(wrong, mine)
        bad = [p for part in wrong for p in part]
        if not bad:
            return candidate
        damaged.append(f"{candidate.name}: {'; '.join(bad)}")
        log.log({"event": "checkpoint_skipped", "checkpoint": str(candidate), "problems": bad})
        if rank == 0:
            print(f"graft: skipping damaged checkpoint {candidate}: {'; '.join(bad)}", flush=True)
    if found:
        raise ckpt.no_usable(parent, damaged)
    return None


def config_digest(cfg: FinetuneConfig) -> str:
    """A short hash of the config a worker trains with (sweep trials check all ranks agree)."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ranks_agree(digest: str) -> bool:
    if not torch.distributed.is_initialized():
        return True
    mine = torch.tensor([int(digest, 16) & (2**62 - 1)], dtype=torch.int64, device=_reduce_device())
    low, high = mine.clone(), mine.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(low.item() == high.item())


# --------------------------------------------------------------------------- phases
def start_engine(
    model: torch.nn.Module,
    strategy: StrategyConfig,
    cfg: FinetuneConfig,
    layout: Layout,
    *,
    world: int,
    width: int,
    phase: Phase | None = None,
    task: Any = None,
    pretrained: Any = None,
    weights: dict[str, torch.Tensor] | None = None,
    term_weights: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
    labels: list[str] | None = None,
    run_dir: Path | None = None,
) -> PhaseEngine:
    """Apply a phase's strategy, group the trainable parameters (discriminative lrs),
    attach the loss terms and start its DeepSpeed engine. The worker's path;
    ``jobs.memprobe`` measures this too."""
    deepspeed = engine_lib.import_deepspeed()

    train = cfg.train
    phase = phase or Phase(0, strategy.name, 0, train.max_steps, strategy)
    if pretrained is None:  # the weights as given are the reference (bare names)
        initial = dict(model.state_dict())
        pretrained = lambda: initial  # noqa: E731
    model = strategies.apply_phase(model, phase, layout)
    if weights is not None:  # the previous phase's, into the same wrapping (peft or not)
        model.load_state_dict(weights)
    groups = param_groups(
        model,
        layout,
        lr=train.lr,
        lr_ratio=strategy.lr_ratio,
        head_lr_mult=strategy.head_lr_mult,
        weight_decay=train.weight_decay,
    )
    module: torch.nn.Module = model
    terms = objectives.build(cfg.objectives)
    if terms:
        context = objectives.Context(
            layout=layout,
            task=task or tasks.get(cfg.model),
            zero_stage=cfg.deepspeed.stage,
            pretrained=pretrained,
            tokenizer=tokenizer,
            labels=labels,
            data=cfg.data,
            micro_batch_size=train.micro_batch_size,
            run_dir=run_dir,
        )
        module = objectives.Objective(model, context.task, terms, context)
        if term_weights:  # the previous phase's DANN classifier, task heads, ...
            objectives.load_term_state(module, term_weights)
        # (a multi-task head shares the model's backbone: its parameters are grouped once)
        grouped = {id(p) for g in groups for p in g["params"]}
        extra = [p for p in module.terms.parameters() if p.requires_grad and id(p) not in grouped]
        if extra:
            groups.append(
                {"name": "terms", "params": extra, "lr": train.lr, "weight_decay": 0.0, "depth": 0}
            )
    # Counted before DeepSpeed: under ZeRO-3 each rank's tensors are [0] afterwards.
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    engine_lib.lean_deepspeed()
    groups = merge_alike(groups)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=engine_lib.optimizer(groups, train),
        lr_scheduler=partial(
            engine_lib.scheduler,
            train=train,
            start_step=phase.start_step,
            rewarmup_steps=phase.rewarmup_steps,
        ),
        config=engine_lib.deepspeed_config(
            cfg.deepspeed, train, world_size=world, hidden_size=width
        ),
        dist_init_required=False,
    )
    return PhaseEngine(engine, [g["names"] for g in groups], trainable, total)


def start_phase(run: Run, phase: Phase, state: State) -> None:
    """This phase's engine (``run.current``): from the model as built (first phase),
    else from the previous phase's weights, the previous engine torn down first."""
    cfg = run.cfg
    model, weights, term_weights, freed = run.model, None, None, None
    if run.current is not None:
        previous, run.current = run.current, None
        weights, term_weights = full_weights(previous.engine)
        before = memory.live_tensor_bytes()
        previous.engine.destroy()
        del previous
        gc.collect()
        freed = before - memory.live_tensor_bytes(collect=False)  # what the torn-down engine held
        model = _fresh_model(run)
    current = start_engine(
        model,
        phase.strategy,
        cfg,
        run.layout,
        world=run.world,
        width=run.width,
        phase=phase,
        task=run.task,
        pretrained=partial(_pretrained_weights, run),
        weights=weights,
        term_weights=term_weights,
        tokenizer=run.tokenizer,
        labels=run.dataset.labels,
        run_dir=run.run_dir,
    )
    del weights, term_weights
    run.model = None  # type: ignore[assignment]  # the engine owns it now
    run.current = current
    run.marks.mark("engine" if phase.index == 0 else f"engine.{phase.index}")
    lrs = current.lrs()
    if run.resume_from is not None and phase.index == state.phase:
        meta = ckpt.read_meta(run.resume_from)
        saved = ckpt.load(
            current.engine, run.resume_from, rank=run.rank, world_size=run.world, barrier=_barrier
        )
        for key, value in saved.items():
            setattr(state, key, value)
        was = (
            int(meta["world_size"]),
            int(meta.get("micro_batch_size", cfg.train.micro_batch_size)),
        )
        if was != (run.world, cfg.train.micro_batch_size):  # another world size: same data order
            state.micro_step = data_lib.continue_order(
                state.micro_step,
                num_examples=len(run.train_set),
                was=was,
                now=(run.world, cfg.train.micro_batch_size),
            )
        run.log.truncate_after(state.step, phase=state.phase)
        run.log.log(
            {
                "event": "resume",
                "step": state.step,
                "phase": phase.index,
                "checkpoint": str(run.resume_from),
                "world_size": run.world,
                "checkpoint_world_size": was[0],
                "session": run.session,
                "pids": run.pids,
            }
        )
        run.resume_from = None
        return
    state.phase = phase.index
    record = {
        "step": state.step,
        "phase": phase.index,
        "phase_name": phase.name,
        "trainable_params": current.trainable,
        "total_params": current.total,
        "trainable_blocks": phase.trainable_blocks,
        "end_step": phase.end_step,
        "lr": lrs,
    }
    if phase.index == 0 and state.step == 0:
        run.log.log(
            {
                "event": "start",
                **record,
                "world_size": run.world,
                "global_batch": engine_lib.global_batch_size(cfg.train, run.world),
                "config_digest": run.digest,
                "num_phases": len(run.phases),
                "session": run.session,
                "pids": run.pids,
                # this worker's tokenised-data cache (jobs/data/cache.py): hits, misses
                "token_cache": dict(token_cache.stats),
                # from the run's start (a pool: its submission) to its engine, ready to train
                "startup_s": time.time() - run.started,
                "startup": run.marks.since(run.started),  # where that went (jobs/timeline.py)
            }
        )
        if cfg.train.eval_at_start:
            current.engine.eval()
            run.log.log({"event": "baseline", "step": 0, **_evaluate(run, current)})
        if run.source_batches:  # the forgetting probe, before any training
            current.engine.eval()
            scores = evaluate(current.engine, run.source_batches, task=run.task, prefix="source")
            if run.rank == 0:
                (run.run_dir / SOURCE_BEFORE).write_text(json.dumps(scores))
            run.log.log({"event": "source_before", "step": 0, **scores})
    else:
        # Optimizer moments start afresh in each phase: DeepSpeed keeps them in flat
        # per-group partitions whose layout follows the trainable set, which changed.
        run.log.log({"event": "phase", **record, "freed_bytes": freed, "optimizer": "reset"})


def full_weights(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The bare model's whole state dict and the loss terms' own trained parameters
    (``objectives.trained_term_state``), on every rank (gathered under ZeRO-3)."""
    module = objectives.unwrap(engine.module)

    def copies() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return weights, objectives.trained_term_state(engine.module)

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        # the model and the terms' trained parameters (a frozen teacher stays partitioned)
        wanted = {id(p): p for p in module.parameters()}
        wanted.update({id(p): p for p in engine.module.parameters() if p.requires_grad})
        with deepspeed.zero.GatheredParameters(list(wanted.values())):
            return copies()
    return copies()


def _fresh_model(run: Run) -> torch.nn.Module:
    """The architecture again, without reading weights (the caller loads them); the RNG
    is left as it was, so a phase switch does not change what the run samples next."""
    with torch.random.fork_rng():
        model, _ = build(
            dataclasses.replace(run.cfg.model, pretrained=False),
            labels=run.dataset.labels,
            seed=run.cfg.train.seed,
        )
    return model


def _pretrained_weights(run: Run) -> dict[str, torch.Tensor]:
    """The model's weights as built at step 0 (L2-SP's reference), built again."""
    with torch.random.fork_rng():
        model, _ = build(run.cfg.model, labels=run.dataset.labels, seed=run.cfg.train.seed)
    return model.state_dict()


# --------------------------------------------------------------------------- training
def train_phase(run: Run, phase: Phase, current: PhaseEngine, state: State) -> None:
    train, engine = run.cfg.train, current.engine
    early = train.early_stopping
    batches = data_lib.train_batches(
        run.train_set,
        rank=run.rank,
        world_size=run.world,
        seed=train.seed,
        micro_batch_size=train.micro_batch_size,
        pad_id=models_pad_id(run.tokenizer),
        start_micro_step=state.micro_step,
        collate_fn=run.task.collate,
    )
    extra = {
        stream.name: data_lib.train_batches(
            stream.encoded,
            rank=run.rank,
            world_size=run.world,
            seed=train.seed + 1 + i,  # its own order, not the training data's
            micro_batch_size=train.micro_batch_size,
            pad_id=models_pad_id(run.tokenizer),
            start_micro_step=state.micro_step,
            collate_fn=stream.collate,
        )
        for i, stream in enumerate(run.streams)
    }
    total_micro = train.max_steps * train.grad_accum_steps
    norms.train_mode(engine)
    window = _Window()
    clock = time.time()
    while state.step < phase.end_step and not state.stopped_early:
        if _epochs_done(run, state):
            break
        batch: dict[str, Any] = next(batches)
        for name, stream_batches in extra.items():
            batch[name] = {
                **next(stream_batches),
                "progress": torch.tensor(state.micro_step / total_micro),
            }
        outputs = engine(**batch)
        loss = outputs.loss
        engine.backward(loss)
        engine.step()
        state.micro_step += 1
        window.add(loss, batch, getattr(outputs, "terms", None))
        if state.micro_step % train.grad_accum_steps:
            continue
        norms.average_running_stats(engine.module)
        if _STEP_SLEEP_S:
            time.sleep(_STEP_SLEEP_S)
        state.step += 1
        run.poll()
        last = state.step == train.max_steps or _epochs_done(run, state)
        end_of_phase = last or state.step == phase.end_step
        record: dict[str, Any] = {}
        if state.step % train.log_every == 0 or end_of_phase or state.step == 1:
            record.update(window.flush(run, current, state))
            if state.step == 1:
                record["time_to_first_step_s"] = time.time() - run.started
                run.marks.mark("first_step")

        save = state.step % train.checkpoint_every == 0 or end_of_phase
        if state.step % train.eval_every == 0 or end_of_phase:
            engine.eval()
            record.update(_evaluate(run, current, final_step=state.step if last else None))
            norms.train_mode(engine)
            value = record[early.metric]
            if _improved(value, state.best, mode=early.mode, min_delta=early.min_delta):
                state.best, state.best_step, state.evals_without_improvement = value, state.step, 0
                save = save or early.enabled  # the best weights must be on disk to export them
            else:
                state.evals_without_improvement += 1
                state.stopped_early = (
                    early.enabled and state.evals_without_improvement >= early.patience
                )

        preempt.exit_if_driver_gone()  # (before anything of this step is written)
        if record:
            run.log.log({"step": state.step, **record})
        # Ray's controller drains reports on its health-check tick (2 s by default), so
        # report only evals and checkpoints, not every logged step.
        if save or state.stopped_early or "eval_loss" in record:
            state.train_time_s += time.time() - clock
            clock = time.time()
            record["evals"] = math.ceil(state.step / train.eval_every)
            _report(run, engine, record, state, save=save or state.stopped_early)
        why = preempt.asked(run.run_dir)
        if _all_max(int(why is not None)):  # (every rank stops at this same step)
            if not save:
                state.train_time_s += time.time() - clock
                save_checkpoint(run, engine, state)
            run.log.log(
                {"event": "preempted", "step": state.step, "by": why or "SIGTERM to a worker"}
            )
            raise preempt.Preempted(why or "SIGTERM to a worker")
        if run.fail_at_step is not None and state.step == run.fail_at_step:
            raise RuntimeError(f"GRAFT_FAIL_AT_STEP={run.fail_at_step}: injected failure")
        if run.stop_at_step is not None and state.step == run.stop_at_step:
            raise Cancelled(f"GRAFT_STOP_AT_STEP={run.stop_at_step}")


def _epochs_done(run: Run, state: State) -> bool:
    """train.max_epochs ran out (before train.max_steps): no later phase runs."""
    return run.max_micro_steps is not None and state.micro_step >= run.max_micro_steps


class _Window:
    """Train metrics summed between two logged steps."""

    def __init__(self) -> None:
        self.loss, self.micro, self.tokens, self.start = 0.0, 0, 0, time.time()
        self.examples = 0
        self.text = False  # batches of token ids (tokens/s is logged)
        self.terms: dict[str, float] = {}

    def add(
        self, loss: torch.Tensor, batch: dict[str, torch.Tensor], terms: dict[str, Any] | None
    ) -> None:
        self.loss += loss.item()
        self.micro += 1
        self.examples += int(batch["labels"].size(0))
        if "attention_mask" in batch:  # (every rank's batches are of one kind)
            self.text = True
            self.tokens += int(batch["attention_mask"].sum())
        for name, value in (terms or {}).items():
            self.terms[name] = self.terms.get(name, 0.0) + float(value)

    def flush(self, run: Run, current: PhaseEngine, state: State) -> dict[str, Any]:
        train = run.cfg.train
        elapsed = time.time() - self.start
        record = {
            "loss": _all_mean(self.loss / self.micro),
            "lr": current.lrs(),
            "examples_per_s": _all_mean(self.examples / elapsed) * run.world,
            "steps_per_s": self.micro / train.grad_accum_steps / elapsed,
            "epoch": state.micro_step / run.per_epoch,
        }
        if self.text:
            record["tokens_per_s"] = _all_mean(self.tokens / elapsed) * run.world
        if len(run.phases) > 1:
            record["phase"] = state.phase
        for name, total in self.terms.items():
            record[name] = _all_mean(total / self.micro)
        self.__init__()  # type: ignore[misc]
        return record


def _evaluate(run: Run, current: PhaseEngine, *, final_step: int | None = None) -> dict[str, Any]:
    """The validation split, and the terms' extra sets (DANN's labelled target data).
    At the run's last step (``final_step``) also what ``finish`` reports of the same
    weights (the confusion matrix, the per-example sums), kept in ``run.final_eval`` so
    that ``finish`` does not evaluate them again."""
    final = final_step is not None
    examples: list[torch.Tensor] = []
    scores = evaluate(
        current.engine,
        run.eval_batches,
        task=run.task,
        confusion=final,
        per_example=examples if final and not run.test_batches else None,
        generate=_generation(run, current.engine),
    )
    for prefix, batches in run.extra_evals.items():
        scores.update(evaluate(current.engine, batches, task=run.task, prefix=prefix))
    scores.update(_task_scores(run, current.engine, scores["eval_accuracy"]))
    if final:
        assert final_step is not None
        run.final_eval = FinalEval(final_step, dict(scores), examples)
        scores.pop("eval_confusion", None)  # (reported at the end, not at every step)
    return scores


def _generation(run: Run, engine: Any) -> Any:
    """For a task that generates (seq2seq): its per-example generation sums of a batch,
    from the model inside the engine (all ranks generate in step); None otherwise."""
    if not run.task.generates:
        return None
    task = cast(tasks.Generating, run.task)
    return partial(
        task.generation_sums,
        objectives.unwrap(engine.module),
        tokenizer=run.tokenizer,
        max_new_tokens=run.cfg.eval.max_new_tokens,
    )


def _task_scores(run: Run, engine: Any, main_accuracy: float) -> dict[str, Any]:
    """Each extra task's held-out part through its own head: ``eval_accuracy/<task>``
    and the others, and ``eval_accuracy/mean`` over the run's task and these."""
    if not run.task_evals:
        return {}
    scores: dict[str, Any] = {}
    accuracies = []
    for (term, name), (kind, batches) in run.task_evals.items():
        route = partial(engine, **{objectives.multitask.ROUTE: (term, name)})
        for key, value in evaluate(route, batches, task=kind).items():
            scores[f"{key}/{name}"] = value
        accuracies.append(scores[f"eval_accuracy/{name}"])
    scores["eval_accuracy/mean"] = (main_accuracy + sum(accuracies)) / (1 + len(accuracies))
    return scores


def _reduce_device() -> torch.device:
    """Where a small collective's tensor must live: NCCL reduces GPU tensors only."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return float(t.item())


def _all_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _improved(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _report(run: Run, engine: Any, metrics: dict[str, Any], state: State, *, save: bool) -> None:
    """The run's report on every rank (ray.train.report is a barrier), after a checkpoint
    when ``save``."""
    if save:
        save_checkpoint(run, engine, state)
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    flat["step"] = state.step
    run.report(flat)


def save_checkpoint(run: Run, engine: Any, state: State) -> None:
    """Every rank writes its shards into <run>/checkpoints/step_N, then its commit marker;
    rank 0 then drops old complete checkpoints beyond train.keep_checkpoints (the best
    one is kept while early stopping needs it)."""
    preempt.exit_if_driver_gone()
    parent = run.run_dir / CHECKPOINTS
    directory = parent / ckpt.dir_name(state.step)
    if run.rank == 0 and directory.exists():
        shutil.rmtree(directory)  # a half-written one from a crashed attempt
    _barrier()
    ckpt.save(
        engine,
        directory,
        rank=run.rank,
        world_size=run.world,
        state=dataclasses.asdict(state),
        micro_batch_size=run.cfg.train.micro_batch_size,
        grad_accum_steps=run.cfg.train.grad_accum_steps,
        barrier=_barrier,
    )
    _barrier()
    if run.rank == 0:
        keep = {state.best_step} if run.cfg.train.early_stopping.enabled else set()
        ckpt.prune(parent, keep=run.cfg.train.keep_checkpoints, also=keep)


# --------------------------------------------------------------------------- finish
EXAMPLE_SUMS = runlog.EXAMPLE_SUMS


def _save_example_sums(run: Run, mine: list[torch.Tensor], split: str) -> None:
    """<run>/example_sums_<split>.pt: one row of eval sums per example, in the split's
    order (rank r's k-th example is example r + k * world)."""
    gathered: list[Any] = [mine]
    if torch.distributed.is_initialized() and run.world > 1:
        gathered = [None] * run.world
        torch.distributed.all_gather_object(gathered, mine)
    if run.rank != 0:
        return
    rows: dict[int, torch.Tensor] = {}
    for r, part in enumerate(gathered):
        for k, row in enumerate(part):
            rows[r + k * run.world] = row.cpu()
    if rows:
        table = torch.stack([rows[i] for i in sorted(rows)])
        torch.save(table, run.run_dir / EXAMPLE_SUMS.format(split=split))


SOURCE_BEFORE = "source_before.json"  # the probe's scores before training (for a resume)


def forgetting(run: Run, engine: Any) -> dict[str, Any]:
    """The source data scored again, and what was forgotten since the start: accuracy
    before - after (``forgotten``), loss after - before (``forgotten_loss``)."""
    _barrier()  # rank 0 wrote the scores before training; every rank reads them
    before = json.loads((run.run_dir / SOURCE_BEFORE).read_text())
    after = evaluate(engine, run.source_batches, task=run.task, prefix="source")
    return {
        **after,
        "source_loss_before": before["source_loss"],
        "source_accuracy_before": before["source_accuracy"],
        "forgotten": before["source_accuracy"] - after["source_accuracy"],
        "forgotten_loss": after["source_loss"] - before["source_loss"],
    }


def finish(run: Run, current: PhaseEngine, state: State) -> None:
    """The best weights back (early stopping), the final and test evaluation, the
    export, and the run's result reported to Ray."""
    cfg, engine = run.cfg, current.engine
    early = cfg.train.early_stopping
    last = run.final_eval if run.final_eval and run.final_eval.step == state.step else None
    if early.enabled and state.best_step is not None and state.best_step != state.step:
        # (preflight keeps early stopping to one-phase strategies: the best checkpoint
        # was written by this engine)
        best_dir = run.run_dir / CHECKPOINTS / ckpt.dir_name(state.best_step)
        ckpt.load(engine, best_dir, rank=run.rank, world_size=run.world, barrier=_barrier)
        last = None
    engine.eval()
    # Each held-out example's own sums (the test split, else validation), for the
    # sweep's paired bootstrap of a difference between two runs.
    examples: list[torch.Tensor] = []
    if last is not None:  # the last step's evaluation was of these weights
        scores, examples = dict(last.scores), list(last.examples)
    else:  # (a best checkpoint restored, or a rerun of a finished run)
        scores = evaluate(
            engine,
            run.eval_batches,
            task=run.task,
            confusion=True,
            per_example=None if run.test_batches else examples,
            generate=_generation(run, engine),
        )
        for prefix, batches in run.extra_evals.items():
            scores.update(evaluate(engine, batches, task=run.task, prefix=prefix))
        scores.update(_task_scores(run, engine, scores["eval_accuracy"]))
    final: dict[str, Any] = {
        **scores,
        "trainable_params": current.trainable,
        "train_time_s": state.train_time_s,
    }
    if run.test_batches:
        final.update(
            evaluate(
                engine,
                run.test_batches,
                task=run.task,
                prefix="test",
                confusion=True,
                per_example=examples,
                generate=_generation(run, engine),
            )
        )
    if run.source_batches:
        final.update(forgetting(run, engine))
    _save_example_sums(run, examples, "test" if run.test_batches else "eval")
    run.log.log(
        {
            "event": "end",
            "step": state.step,
            "stopped_early": state.stopped_early,
            "best_step": state.best_step,
            "phase": state.phase,
            # the confusion matrices' row/column names (classification)
            **({"labels": list(run.dataset.labels)} if run.dataset.labels else {}),
            **final,
        }
    )
    if cfg.run.export:
        export(
            engine,
            run.tokenizer,
            cfg,
            run.run_dir / "export",
            labels=run.dataset.labels,
            metrics=final,
        )
        run.log.artifact(run.run_dir / "export", "export")
    run.log.close()
    engine.destroy()
    # The run's result, also when a rerun found it already finished: a sweep trial's
    # objective values come from this report ("final" tells a finished trial from a pruned one).
    flat = {k: v for k, v in final.items() if isinstance(v, (int, float))}
    run.report(
        {
            **flat,
            "step": state.step,
            "evals": math.ceil(state.step / cfg.train.eval_every),
            "final": 1,
        },
        final=True,
    )
