"""`graft plan --recommend`: the cheapest configurations that fit, as overrides."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from conf.schema import FinetuneConfig, StrategyConfig
from jobs import tasks
from jobs.plan.memory import model_states
from jobs.plan.trace import trace


# --------------------------------------------------------------------------- recommend
@dataclass(frozen=True)
class Option:
    """One candidate configuration: its overrides, its cost and its memory."""

    overrides: tuple[str, ...]
    cost: float
    total: int


# Relative step-time penalties (rough, from DeepSpeed's docs and common measurements):
# ZeRO-2/3 add communication, offload moves states over PCIe and runs Adam on the CPU,
# checkpointing recomputes the forward (~1/3 of a step), smaller micro batches use
# the GPU less well. Changing what trains (LoRA, freezing) changes the result, so it
# comes last.
_STAGE_COST = {0: 0.0, 1: 0.02, 2: 0.05, 3: 0.2}
_OFFLOAD_COST = {(False, False): 0.0, (True, False): 1.0, (True, True): 2.5}
_CKPT_COST = 0.33
_HALVING_COST = 0.1
_STRATEGY_COST = 3.0


def _strategy_variants(
    cfg: FinetuneConfig, num_blocks: int
) -> list[tuple[StrategyConfig, tuple[str, ...]]]:
    """The configured strategy, then LoRA and freeze-depth alternatives (if it trains more)."""
    variants: list[tuple[StrategyConfig, tuple[str, ...]]] = [(cfg.strategy, ())]
    if cfg.strategy.name != "lora":
        lora = replace(cfg.strategy, name="lora", num_trainable_blocks=None)
        variants.append((lora, ("strategy=lora", f"strategy.lora.r={lora.lora.r}")))
    if cfg.strategy.name in ("full", "freeze_depth"):
        current = cfg.strategy.num_trainable_blocks or num_blocks
        for k in sorted({max(1, num_blocks // 4), max(1, num_blocks // 2)}):
            if k < current:
                frozen = replace(cfg.strategy, name="freeze_depth", num_trainable_blocks=k)
                variants.append(
                    (frozen, ("strategy=freeze_depth", f"strategy.num_trainable_blocks={k}"))
                )
    return variants


def recommend(
    cfg: FinetuneConfig, *, num_gpus: int | None, device_bytes: int, limit: int = 5
) -> list[Option]:
    """The cheapest configurations that fit ``device_bytes`` per device, cheapest first."""
    world = num_gpus or cfg.scaling.num_workers
    # (the counts only: a short input; an image model takes only its own size)
    base_counts, _ = trace(cfg, seq_len=8 if tasks.get(cfg.model).modality == "text" else None)
    options: list[Option] = []
    mb0, accum0 = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    micro_batches = [mb0 // 2**i for i in range(int(math.log2(mb0)) + 1)]
    for strategy, strategy_overrides in _strategy_variants(cfg, base_counts.num_blocks):
        variant = replace(cfg, strategy=strategy)
        counts, acts = trace(variant)
        for stage, (off_opt, off_par), ckpt, mb in itertools.product(
            (0, 1, 2, 3), _OFFLOAD_COST, (False, True), micro_batches
        ):
            if (off_opt and stage == 0) or (off_par and stage != 3):
                continue
            if strategy.lora.quantize and (stage == 3 or off_par):
                continue
            states = model_states(
                counts,
                stage=stage,
                world=world,
                bf16=cfg.deepspeed.bf16,
                offload_optimizer=off_opt,
                offload_params=off_par,
            )
            total = states.total + acts.bytes(mb, ckpt)
            if total > device_bytes:
                continue
            halvings = int(math.log2(mb0 // mb))
            cost = (
                _STAGE_COST[stage]
                + _OFFLOAD_COST[(off_opt, off_par)]
                + (_CKPT_COST if ckpt else 0.0)
                + _HALVING_COST * halvings
                + (_STRATEGY_COST if strategy_overrides else 0.0)
            )
            overrides = [*strategy_overrides, f"deepspeed=zero{stage}"]
            if off_opt:
                overrides.append("deepspeed.offload_optimizer=true")
            if off_par:
                overrides.append("deepspeed.offload_params=true")
            if ckpt:
                overrides.append("model.activation_checkpointing=true")
            if mb != mb0:
                overrides += [
                    f"train.micro_batch_size={mb}",
                    f"train.grad_accum_steps={accum0 * mb0 // mb}",
                ]
            options.append(Option(tuple(overrides), cost, total))
    options.sort(key=lambda o: (o.cost, o.total))
    return options[:limit]
