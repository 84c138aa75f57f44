"""full: every parameter trains.

graft finetune strategy=full
"""

from __future__ import annotations

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    return model.requires_grad_(True)
