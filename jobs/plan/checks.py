"""Compatibility checks: each a small function of (config, counts, world, GPUs) that
returns verdicts with a reason; ``CHECKS`` lists them in the order they print."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from conf.schema import ConfigError, FinetuneConfig
from jobs.engine import global_batch_size
from jobs.plan.memory import Memory
from jobs.plan.trace import Activations, Counts
from jobs.plan.units import fmt


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    level: str  # "ok" | "warn" | "error"
    key: str
    message: str


@dataclass
class Plan:
    cfg: FinetuneConfig
    world: int
    device_bytes: int | None
    counts: Counts
    activations: Activations
    memory: Memory
    memory_checkpointed: int  # total with activation checkpointing on
    checks: list[Check] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.memory.total <= self.device_bytes

    @property
    def ok(self) -> bool:
        return not any(c.level == "error" for c in self.checks) and self.fits is not False


@dataclass(frozen=True)
class Context:
    """What every check gets."""

    cfg: FinetuneConfig
    counts: Counts
    world: int
    num_gpus: int | None


def _values(c: Context) -> list[Check]:
    """Each config group's own checks, as verdicts (the planner reports, not raises)."""
    checks = []
    for group in (c.cfg.model, c.cfg.strategy, c.cfg.deepspeed, c.cfg.train, c.cfg.scaling):
        try:
            group.check()
        except ConfigError as e:
            checks.append(Check("error", e.key, e.message))
    return checks


def _zero3_frozen(c: Context) -> list[Check]:
    ds, strategy, counts = c.cfg.deepspeed, c.cfg.strategy, c.counts
    lora = strategy.name == "lora"
    if ds.stage != 3 or not (counts.frozen > 0 or lora):
        return []
    what = "LoRA adapters" if lora else f"{counts.frozen:,} frozen parameters"
    checks = [
        Check(
            "ok",
            "deepspeed.stage",
            f"ZeRO-3 with {what}: frozen weights are partitioned too; the export gathers "
            "the 16-bit weights on rank 0 (stage3_gather_16bit_weights_on_model_save)",
        )
    ]
    if lora and c.cfg.run.export_merged:
        checks.append(
            Check(
                "warn",
                "run.export_merged",
                f"merging LoRA under ZeRO-3 reloads the full base model on rank 0's host "
                f"({fmt(counts.total * 2)} in 16-bit) after training; export the adapter only "
                "(run.export_merged=false) if the host is short of memory",
            )
        )
    return checks


def _qlora(c: Context) -> list[Check]:
    ds, strategy = c.cfg.deepspeed, c.cfg.strategy
    if strategy.name != "lora" or not strategy.lora.quantize:
        return []
    checks = []
    if ds.stage == 3:
        checks.append(
            Check(
                "error",
                "strategy.lora.quantize",
                "QLoRA x ZeRO-3: 4-bit weights cannot be partitioned unless bitsandbytes "
                "stores them in a 16-bit container (bnb_4bit_quant_storage), which graft "
                "does not set; use deepspeed=zero2 (the base is frozen, so ZeRO-2 already "
                "shards everything that trains)",
            )
        )
    if ds.offload_params:
        checks.append(
            Check(
                "error",
                "deepspeed.offload_params",
                "QLoRA x parameter offload: quantized weights cannot be offloaded; "
                "allowed: deepspeed.offload_params=false",
            )
        )
    if not (c.num_gpus or c.cfg.scaling.gpus_per_worker):
        checks.append(
            Check(
                "error",
                "strategy.lora.quantize",
                "QLoRA needs CUDA GPUs (bitsandbytes 4-bit kernels); this plan has none",
            )
        )
    return checks


def _offload(c: Context) -> list[Check]:
    ds = c.cfg.deepspeed
    checks = []
    if ds.offload_optimizer:
        checks.append(
            Check(
                "warn",
                "deepspeed.offload_optimizer",
                "offload runs graft's torch AdamW on the CPU (zero_force_ds_cpu_optimizer is "
                "off so discriminative parameter groups keep working): correct, but several "
                "times slower per step than DeepSpeedCPUAdam; use it only when it must fit",
            )
        )
    if ds.offload_params and not ds.offload_optimizer:
        checks.append(
            Check(
                "warn",
                "deepspeed.offload_params",
                "parameter offload without optimizer offload keeps the optimizer on the GPU "
                "while parameters stream over PCIe every step; offload the optimizer first",
            )
        )
    return checks


def _context_length(c: Context) -> list[Check]:
    context, wanted = c.counts.context, c.cfg.data.max_length
    if context is None or wanted <= context:
        return []
    return [
        Check(
            "error",
            "data.max_length",
            f"{wanted} tokens is more than the model's context "
            f"({context}, max_position_embeddings); allowed: 1..{context}",
        )
    ]


def _gpus(c: Context) -> list[Check]:
    scaling, num_gpus = c.cfg.scaling, c.num_gpus
    if num_gpus is None:
        return []
    configured = scaling.num_workers * max(scaling.gpus_per_worker, 1)
    if not scaling.gpus_per_worker:
        return [
            Check(
                "warn",
                "scaling.gpus_per_worker",
                f"planned for {num_gpus} GPUs, but scaling/ asks for CPU workers "
                f"(gpus_per_worker=0); to run it: scaling.num_workers={num_gpus} "
                "scaling.gpus_per_worker=1 (or scaling=gpu8)",
            )
        ]
    if num_gpus != configured:
        return [
            Check(
                "warn",
                "scaling.num_workers",
                f"--num-gpus {num_gpus} but scaling/ gives {configured} "
                f"({scaling.num_workers} workers x {scaling.gpus_per_worker} GPUs); "
                f"the plan uses {num_gpus}",
            )
        ]
    return []


def _batch(c: Context) -> list[Check]:
    cfg, world = c.cfg, c.world
    if world == cfg.scaling.num_workers:
        return []
    wanted = global_batch_size(cfg.train, cfg.scaling.num_workers)
    per_step = cfg.train.micro_batch_size * world
    if wanted % per_step:
        return [
            Check(
                "warn",
                "train.grad_accum_steps",
                f"the configured global batch {wanted} (micro batch "
                f"{cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x "
                f"{cfg.scaling.num_workers} workers) is not divisible by micro batch x "
                f"{world} ranks = {per_step}; pick train.micro_batch_size so that "
                f"{wanted} / ({world} x micro batch) is whole",
            )
        ]
    return [
        Check(
            "ok",
            "train.grad_accum_steps",
            f"to keep the global batch {wanted} on {world} ranks: "
            f"train.grad_accum_steps={wanted // per_step}",
        )
    ]


CHECKS: list[Callable[[Context], list[Check]]] = [
    _values,
    _zero3_frozen,
    _qlora,
    _offload,
    _context_length,
    _gpus,
    _batch,
]


def compatibility(
    cfg: FinetuneConfig, counts: Counts, *, world: int, num_gpus: int | None
) -> list[Check]:
    """Verdicts on combinations that fail, or work worse than users expect."""
    context = Context(cfg, counts, world, num_gpus)
    return [check for fn in CHECKS for check in fn(context)]
