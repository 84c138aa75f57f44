"""Transfer strategies, picked by ``strategy.name``; each is a module with ``apply``.

    python -c "from jobs.strategies import STRATEGIES; print(sorted(STRATEGIES))"

``apply(model, cfg, layout)`` sets which parameters train (or wraps the model, for LoRA)
and returns the model. Discriminative learning rates (``discriminative.param_groups``)
combine with all of them.

Training is a list of phases; a phase fixes which parameters train and owns one
DeepSpeed engine started from the previous phase's weights, so the trainable set can
change safely under ZeRO-3 (progressive unfreezing). Every strategy here has one phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout
from jobs.strategies import feature_extraction, freeze_depth, full, lora

Apply = Callable[[nn.Module, StrategyConfig, Layout], nn.Module]

STRATEGIES: dict[str, Apply] = {
    "full": full.apply,
    "feature_extraction": feature_extraction.apply,
    "freeze_depth": freeze_depth.apply,
    "lora": lora.apply,
}


@dataclass(frozen=True)
class Phase:
    name: str
    start_step: int
    end_step: int
    strategy: StrategyConfig


def phases(cfg: StrategyConfig, max_steps: int) -> list[Phase]:
    return [Phase(name=cfg.name, start_step=0, end_step=max_steps, strategy=cfg)]


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    return STRATEGIES[cfg.name](model, cfg, layout)
