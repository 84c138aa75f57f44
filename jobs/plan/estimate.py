"""A config's plan: trace, memory per device, checks."""

from __future__ import annotations

import dataclasses

from conf.schema import FinetuneConfig
from jobs.plan.checks import Check, Plan, compatibility
from jobs.plan.memory import model_states
from jobs.plan.trace import Activations, Counts, trace
from jobs.plan.units import fmt


# --------------------------------------------------------------------------- plan
def estimate(
    cfg: FinetuneConfig,
    *,
    num_gpus: int | None = None,
    device_bytes: int | None = None,
    traced: tuple[Counts, Activations] | None = None,
) -> Plan:
    """The per-device memory of ``cfg`` on ``num_gpus`` ranks (default: scaling/)."""
    world = num_gpus or cfg.scaling.num_workers
    counts, acts = traced or trace(cfg)
    ds = cfg.deepspeed
    states = model_states(
        counts,
        stage=ds.stage,
        world=world,
        bf16=ds.bf16,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
    )
    mb, ckpt = cfg.train.micro_batch_size, cfg.model.activation_checkpointing
    memory = dataclasses.replace(states, activations=acts.bytes(mb, ckpt))
    with_ckpt = states.total + acts.bytes(mb, True)
    plan = Plan(cfg, world, device_bytes, counts, acts, memory, with_ckpt)
    plan.checks = compatibility(cfg, counts, world=world, num_gpus=num_gpus)
    if device_bytes is not None and memory.total > device_bytes:
        plan.checks.append(
            Check(
                "error",
                "memory",
                f"needs {fmt(memory.total)} per device, more than the {fmt(device_bytes)} "
                "given; see `graft plan ... --recommend`",
            )
        )
    return plan
