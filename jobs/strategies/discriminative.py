"""Discriminative learning rates: parameter groups whose lr decays with depth.

    graft finetune strategy=freeze_depth strategy.lr_ratio=0.8 strategy.head_lr_mult=10

The block at depth d from the top gets ``lr * lr_ratio**d``; the embeddings sit below the
bottom block; the head gets ``lr * head_lr_mult``. Combines with every strategy: only
trainable parameters are grouped. Groups are named, so logs and checkpoints show them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from jobs.models.families import Layout, Location

_NO_DECAY = ("bias", "norm.weight", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight")


def group_name(location: Location) -> str:
    return f"block.{location.block}" if location.kind == "block" else location.kind


def group_lr(
    location: Location, layout: Layout, *, lr: float, lr_ratio: float, head_lr_mult: float
) -> float:
    if location.kind == "head":
        return lr * head_lr_mult
    return lr * lr_ratio ** layout.depth(location)


def param_groups(
    model: nn.Module,
    layout: Layout,
    *,
    lr: float,
    lr_ratio: float = 1.0,
    head_lr_mult: float = 1.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer groups over trainable parameters, ordered bottom to top.

    Biases and norm weights get no weight decay (their group name ends in ``.no_decay``).
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        location = layout.locate(name)
        decay = weight_decay if not name.endswith(_NO_DECAY) else 0.0
        key = group_name(location) + ("" if decay or not weight_decay else ".no_decay")
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": group_lr(
                    location, layout, lr=lr, lr_ratio=lr_ratio, head_lr_mult=head_lr_mult
                ),
                "weight_decay": decay,
                "depth": layout.depth(location),
            },
        )
        group["params"].append(param)
    return sorted(groups.values(), key=lambda g: (-g["depth"], g["name"]))


def merge_alike(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer groups to build: groups whose settings (lr, weight decay, ...) are
    equal become one, listing its members' names in ``"names"`` (logs still show every
    group's lr). Under ZeRO each optimizer group is its own flat buffer with its own
    all-gather per step, so ten equal groups cost ten collectives where one does: on a
    small model that was most of graft's per-step overhead over a plain loop."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in groups:
        settings = tuple(
            sorted(
                (k, v) for k, v in group.items() if k not in ("params", "name", "names", "depth")
            )
        )
        names = group.get("names", [group["name"]])
        if settings not in merged:
            merged[settings] = {**group, "params": list(group["params"]), "names": list(names)}
            continue
        into = merged[settings]
        into["params"] += group["params"]
        into["names"] += names
        into["name"] = "+".join(into["names"])
        into["depth"] = max(into["depth"], group["depth"])
    return list(merged.values())
