"""feature_extraction: the pretrained backbone is frozen; only the new head trains.

graft finetune strategy=feature_extraction
"""

from __future__ import annotations

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout
from jobs.strategies.freeze_depth import freeze_to


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    return freeze_to(model, layout, 0, train_embeddings=False)
