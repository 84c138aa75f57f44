"""freeze_depth: the top k blocks and the head train; everything below stays frozen.

graft finetune strategy=freeze_depth strategy.num_trainable_blocks=2
"""

from __future__ import annotations

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout, Location


def trains(location: Location, layout: Layout, k: int, train_embeddings: bool) -> bool:
    """Whether a parameter at ``location`` trains when the top ``k`` blocks do."""
    if location.kind == "head":
        return True
    if location.kind == "embeddings":
        return train_embeddings
    if location.kind == "other":  # final norm etc. sit above the top block
        return k > 0
    return layout.depth(location) < k


def freeze_to(
    model: nn.Module, layout: Layout, k: int, *, train_embeddings: bool = False
) -> nn.Module:
    """fastai's freeze_to, counted from the top: k=0 trains the head only."""
    for name, param in model.named_parameters():
        param.requires_grad_(trains(layout.locate(name), layout, k, train_embeddings))
    return model


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    k = layout.num_blocks if cfg.num_trainable_blocks is None else cfg.num_trainable_blocks
    return freeze_to(model, layout, k, train_embeddings=cfg.train_embeddings)
