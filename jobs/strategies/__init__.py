"""Transfer strategies, picked by ``strategy.name``; each is a module with ``apply``.

    python -c "from jobs.strategies import STRATEGIES; print(sorted(STRATEGIES))"

``apply(model, cfg, layout)`` sets which parameters train (or wraps the model, for LoRA)
and returns the model. Discriminative learning rates (``discriminative.param_groups``)
combine with all of them.

Training is a list of phases; a phase fixes which parameters train and owns one
DeepSpeed engine started from the previous phase's weights, so the trainable set can
change safely under ZeRO-3. Every strategy has one phase except ``progressive``
(gradual unfreezing), which has one per unfreeze.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout
from jobs.strategies import feature_extraction, freeze_depth, full, lora, progressive

Apply = Callable[[nn.Module, StrategyConfig, Layout], nn.Module]

STRATEGIES: dict[str, Apply] = {
    "full": full.apply,
    "feature_extraction": feature_extraction.apply,
    "freeze_depth": freeze_depth.apply,
    "lora": lora.apply,
}


@dataclass(frozen=True)
class Phase:
    index: int
    name: str
    start_step: int
    end_step: int
    # The one-phase strategy this phase applies (progressive: freeze_depth or lora).
    strategy: StrategyConfig
    # progressive: the blocks that train in this phase (top down); None otherwise.
    trainable_blocks: int | None = None
    # Steps of lr re-warmup at this phase's start (progressive phases after the first).
    rewarmup_steps: int = 0


def phases(cfg: StrategyConfig, *, max_steps: int, num_blocks: int) -> list[Phase]:
    if cfg.name != "progressive":
        return [Phase(0, cfg.name, 0, max_steps, cfg)]
    plan = progressive.schedule(cfg, max_steps=max_steps, num_blocks=num_blocks)
    _, final = progressive.depths(cfg, num_blocks)
    ends = [start for start, _ in plan[1:]] + [max_steps]
    return [
        Phase(
            index=i,
            name=f"progressive.{i}",
            start_step=start,
            end_step=end,
            strategy=progressive.phase_strategy(cfg, k, final),
            trainable_blocks=k,
            rewarmup_steps=cfg.progressive.rewarmup_steps if i else 0,
        )
        for i, ((start, k), end) in enumerate(zip(plan, ends, strict=True))
    ]


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    return STRATEGIES[cfg.name](model, cfg, layout)


def apply_phase(model: nn.Module, phase: Phase, layout: Layout) -> nn.Module:
    """The trainable set of one phase (its strategy; progressive's depth on top)."""
    if phase.trainable_blocks is None:
        return apply(model, phase.strategy, layout)
    return progressive.apply(model, phase.strategy, layout, trainable_blocks=phase.trainable_blocks)
