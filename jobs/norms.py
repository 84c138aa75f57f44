"""Batch-norm statistics across workers and under frozen layers (CNN backbones).

DeepSpeed keeps parameters the same on every rank but not buffers: each rank's
BatchNorm running mean and variance would follow its own shard of the data, so ranks
would evaluate, checkpoint and export different statistics. After every optimizer
step the running statistics are averaged over ranks (``average_running_stats``).

A BatchNorm layer whose weights are frozen (feature extraction, the lower blocks under
freeze depth) also keeps its statistics: it runs in eval mode while the rest trains
(``train_mode``), so a frozen block computes exactly what it computed before training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def train_mode(module: nn.Module) -> None:
    """``module.train()``, frozen BatchNorm layers left in eval mode."""
    module.train()
    for m in module.modules():
        if isinstance(m, _BatchNorm) and _frozen(m):
            m.eval()


def average_running_stats(module: nn.Module) -> None:
    """Average the BatchNorm running statistics of training layers over ranks (in place;
    every rank ends with the same values). Nothing to do on one rank or without them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [
        b
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]
    if not buffers:
        return
    flat = torch.cat([b.detach().double().flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
