"""progressive: gradual unfreezing (ULMFiT), one phase per unfreeze.

    graft finetune strategy=progressive strategy.progressive.unfreeze_every=20 \
        [strategy.num_trainable_blocks=0] [strategy.progressive.final_blocks=4] \
        [strategy.progressive.base=lora] [strategy.lr_ratio=0.8]

Phase 0 trains the top ``num_trainable_blocks`` blocks (0 = the head only); each later
phase trains ``blocks_per_phase`` more, top down, until ``final_blocks``. The boundaries
are every ``unfreeze_every`` steps, or the listed steps / fractions of the run, or (when
neither is given) equal shares of the run. Each phase owns one DeepSpeed engine built
from the previous phase's weights (``jobs.finetune``), which is how the trainable set
changes safely under ZeRO-3.

With ``base=lora`` the adapters go into all ``final_blocks`` blocks from the start and
the phases unfreeze them top down (the new head, if any, trains throughout).
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from conf.schema import ConfigError, StrategyConfig
from jobs.models.families import Layout
from jobs.strategies import freeze_depth, lora


def depths(cfg: StrategyConfig, num_blocks: int) -> tuple[int, int]:
    """(first phase's depth, final depth)."""
    first = cfg.num_trainable_blocks or 0
    final = num_blocks if cfg.progressive.final_blocks is None else cfg.progressive.final_blocks
    if final > num_blocks:
        raise ConfigError(
            "strategy.progressive.final_blocks",
            f"{final} is more than the model's {num_blocks} blocks; allowed: 1..{num_blocks}",
        )
    if first >= final:
        raise ConfigError(
            "strategy.num_trainable_blocks",
            f"progressive starts at {first} trainable blocks but its final depth is {final}; "
            f"allowed: 0..{final - 1} (or raise strategy.progressive.final_blocks)",
        )
    return first, final


def schedule(cfg: StrategyConfig, *, max_steps: int, num_blocks: int) -> list[tuple[int, int]]:
    """[(start step, trainable blocks)] per phase, the first starting at step 0."""
    p = cfg.progressive
    first, final = depths(cfg, num_blocks)
    needed = math.ceil((final - first) / p.blocks_per_phase)  # unfreezes to reach final
    if p.unfreeze is not None:
        if all(0 < u < 1 for u in p.unfreeze):
            starts = [round(u * max_steps) for u in p.unfreeze]
        else:
            starts = [int(u) for u in p.unfreeze]
        if len(starts) > needed:
            raise ConfigError(
                "strategy.progressive.unfreeze",
                f"{len(starts)} unfreezes of {p.blocks_per_phase} block(s) from depth {first} "
                f"go beyond the final depth {final} (the model has {num_blocks} blocks); "
                f"allowed: at most {needed} boundaries",
            )
        if starts[-1] >= max_steps or any(
            b <= a for a, b in zip([0, *starts], starts, strict=False)
        ):
            raise ConfigError(
                "strategy.progressive.unfreeze",
                f"{list(p.unfreeze)} gives steps {starts}: they must increase, after 0 and "
                f"before train.max_steps={max_steps}",
            )
    elif p.unfreeze_every is not None:
        starts = [p.unfreeze_every * i for i in range(1, needed + 1)]
        starts = [s for s in starts if s < max_steps]
    else:  # equal shares of the run
        starts = [round(max_steps * i / (needed + 1)) for i in range(1, needed + 1)]
        starts = sorted({s for s in starts if 0 < s < max_steps})
    plan = [(0, first)]
    for i, start in enumerate(starts, start=1):
        plan.append((start, min(final, first + i * p.blocks_per_phase)))
    return plan


def phase_strategy(cfg: StrategyConfig, trainable_blocks: int, final_blocks: int) -> StrategyConfig:
    """The one-phase strategy a progressive phase applies."""
    if cfg.progressive.base == "lora":
        return dataclasses.replace(cfg, name="lora", num_trainable_blocks=final_blocks)
    return dataclasses.replace(cfg, name="freeze_depth", num_trainable_blocks=trainable_blocks)


def apply(
    model: nn.Module, cfg: StrategyConfig, layout: Layout, *, trainable_blocks: int
) -> nn.Module:
    """A phase's trainable set. ``cfg`` is the phase strategy (freeze_depth or lora)."""
    if cfg.name == "freeze_depth":
        return freeze_depth.apply(model, cfg, layout)
    model = lora.apply(model, cfg, layout)
    for name, param in model.named_parameters():
        if "lora_" in name:
            location = layout.locate(name)
            param.requires_grad_(
                location.kind == "block" and layout.depth(location) < trainable_blocks
            )
    return model
