"""What a rerun may change: the driver's check, before Ray starts and before anything in
the run directory is rewritten, that a config can continue a run's checkpoints.

A rerun with the same ``run.name`` resumes from the newest complete checkpoint. The
checkpoints were trained with the config in ``<run>/config.yaml``; the new config must
train the same thing. Per key:

- may change: ``run.*`` (but run.name/output_dir name the run), ``cluster.*``,
  ``scaling.cpus_per_worker``/``gpus_per_worker``, ``train.eval_every``,
  ``checkpoint_every``, ``log_every``, ``keep_checkpoints``, ``eval_at_start``,
  ``max_failures``, ``eval.*`` except ``eval.source_path`` (the forgetting probe's
  before-scores are in the run), ``sweep.*``;
- ``train.max_steps`` may grow or shrink only where nothing is shaped by it: the
  constant lr schedule and a one-phase strategy. A linear or cosine decay (and a
  progressive strategy's phase boundaries) are laid out over max_steps, so changing it
  would rebuild them mid-run (the lr would jump): refused, start a new run from the export;
- ``scaling.num_workers`` may change (resume on another world size): the workers turn
  the checkpoint's ZeRO shards into DeepSpeed's universal checkpoint and load that; the
  global batch (micro batch x accumulation x workers) is kept: ``train.grad_accum_steps``
  is adjusted where it divides, and ``train.micro_batch_size``/``grad_accum_steps`` may
  be changed by hand as long as the global batch stays the same; where no accumulation
  keeps it, the rerun is refused with the combinations that do;
- everything else (model, data, strategy, objectives, deepspeed, the rest of train) is
  refused, each changed key named with its old and new value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from conf.schema import ConfigError, FinetuneConfig
from jobs import checkpoint as ckpt

CONFIG = "config.yaml"

# Dotted keys (or key prefixes ending in ".") a rerun may change freely.
MAY_CHANGE = (
    "run.",
    "cluster.",
    "sweep.",
    "eval.",
    "scaling.cpus_per_worker",
    "scaling.gpus_per_worker",
    "scaling.num_workers",  # (checked on its own)
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.eval_at_start",
    "train.max_failures",
    "train.max_steps",  # (checked on its own)
    "train.micro_batch_size",  # (with grad_accum_steps: the global batch is checked)
    "train.grad_accum_steps",
)
NEVER = ("eval.source_path",)


@dataclasses.dataclass
class Rerun:
    """What the driver learned about a run directory it is about to resume."""

    checkpoint: Path
    step: int
    world_size: int  # the workers that wrote the checkpoint
    cfg: FinetuneConfig  # the config to run


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: leaf value} (lists are leaves)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _plain(cfg: FinetuneConfig) -> dict[str, Any]:
    return dict(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))


def _saved(path: Path) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    if not path.is_file():
        return None
    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # an unreadable config.yaml: only the checkpoint's own facts remain
        return None
    return dict(json.loads(json.dumps(node, default=str)))


def check_rerun(cfg: FinetuneConfig, run_dir: Path) -> Rerun | None:
    """None for a fresh run (no complete checkpoint); else what will be resumed, with the
    config to run. Raises ConfigError naming every key that cannot change on a resume."""
    # (the sizes only: the workers hash the files before they load one)
    latest = ckpt.latest_usable(run_dir / "checkpoints", full=False)
    if latest is None:
        return None
    meta = ckpt.read_meta(latest)
    rerun = Rerun(latest, int(meta["step"]), int(meta["world_size"]), cfg)
    saved = _saved(run_dir / CONFIG)
    batch = flat(saved) if saved else {}
    for key in ("micro_batch_size", "grad_accum_steps"):  # the checkpoint's own, first
        if key in meta:
            batch[f"train.{key}"] = meta[key]
    rerun.cfg = _check_world(cfg, rerun, batch)
    if saved is not None:
        _check_keys(rerun.cfg, flat(saved), flat(_plain(rerun.cfg)), rerun, run_dir)
    return rerun


def _check_keys(
    cfg: FinetuneConfig, old: dict[str, Any], new: dict[str, Any], rerun: Rerun, run_dir: Path
) -> None:
    def free(key: str) -> bool:
        if key in NEVER:
            return False
        return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE)

    changed = [
        (k, old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not free(k)
    ]
    if changed:
        key, was, now = changed[0]
        also = "".join(f"; {k}: {a!r} -> {b!r}" for k, a, b in changed[1:])
        raise ConfigError(
            key,
            f"{was!r} -> {now!r}{also}: the checkpoints in {run_dir / 'checkpoints'} (step "
            f"{rerun.step}) were trained with the values in {run_dir / CONFIG}, and a resume "
            "cannot change these; rerun with those values, or give a new run.name (to start "
            "from this run's weights: model=hf model.path=<run>/export). May change on a "
            "resume: run.*, cluster.*, eval.* (not eval.source_path), scaling, train."
            "eval_every/checkpoint_every/log_every/keep_checkpoints/eval_at_start/max_failures, "
            "train.micro_batch_size/grad_accum_steps keeping the global batch, and "
            "train.max_steps with train.schedule=constant",
        )
    old_steps, new_steps = old.get("train.max_steps"), cfg.train.max_steps
    if old_steps is not None and old_steps != new_steps:
        shaped = cfg.train.schedule != "constant"
        if shaped or cfg.strategy.name == "progressive":
            what = (
                f"train.schedule={cfg.train.schedule} decays the lr over max_steps"
                if shaped
                else "strategy=progressive lays its phases out over max_steps"
            )
            raise ConfigError(
                "train.max_steps",
                f"{old_steps} -> {new_steps}: {what}, so changing it on a resume would "
                f"rebuild that mid-run (the run is at step {rerun.step}); keep "
                f"train.max_steps={old_steps}, or start a new run.name from this run's export "
                "(model=hf model.path=<run>/export); max_steps may change on a resume only "
                "with train.schedule=constant and a one-phase strategy",
            )
        if new_steps < rerun.step:
            raise ConfigError(
                "train.max_steps",
                f"{new_steps} is before the run's checkpoint at step {rerun.step}; allowed: "
                f">= {rerun.step}",
            )


def _check_world(cfg: FinetuneConfig, rerun: Rerun, old: dict[str, Any]) -> FinetuneConfig:
    """The global batch the checkpoints were trained with is kept on any world size:
    the accumulation is adjusted where it divides, else the rerun is refused with the
    micro batch x accumulation pairs that keep it."""
    world, old_world = cfg.scaling.num_workers, rerun.world_size
    train = cfg.train
    old_micro = int(old.get("train.micro_batch_size", train.micro_batch_size))
    old_accum = int(old.get("train.grad_accum_steps", train.grad_accum_steps))
    target = old_micro * old_accum * old_world
    if train.micro_batch_size * train.grad_accum_steps * world == target:
        return cfg
    if train.grad_accum_steps == old_accum and target % (train.micro_batch_size * world) == 0:
        accum = target // (train.micro_batch_size * world)
        print(
            f"graft: resuming {old_world} workers' checkpoint (step {rerun.step}) on {world}: "
            f"train.grad_accum_steps {old_accum} -> {accum} keeps the global batch {target}",
            flush=True,
        )
        return dataclasses.replace(cfg, train=dataclasses.replace(train, grad_accum_steps=accum))
    pairs = [
        f"train.micro_batch_size={m} train.grad_accum_steps={target // (m * world)}"
        for m in range(1, target + 1)
        if target % (m * world) == 0
    ]
    key = "scaling.num_workers" if world != old_world else "train.micro_batch_size"
    allowed = (
        "; keep it with " + " or ".join(pairs[:4])
        if pairs
        else f"; no micro batch and accumulation give it on {world} workers: allowed "
        "scaling.num_workers: " + ", ".join(str(w) for w in range(1, target + 1) if target % w == 0)
    )
    raise ConfigError(
        key,
        f"the checkpoint {rerun.checkpoint} (step {rerun.step}) was trained with a global batch "
        f"of {target} (micro batch {old_micro} x accumulation {old_accum} x {old_world} workers); "
        f"this rerun's is {train.micro_batch_size} x {train.grad_accum_steps} x {world} = "
        f"{train.micro_batch_size * train.grad_accum_steps * world}, and a resume keeps the "
        f"global batch{allowed} (or give a new run.name)",
    )
