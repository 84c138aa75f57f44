"""Checks that need the model's config or the data, run on the driver before Ray starts.

    python -c "from jobs.config import compose; from jobs.preflight import preflight; \
        print(preflight(compose(['strategy=freeze_depth'])))"
"""

from __future__ import annotations

from dataclasses import dataclass

from conf.schema import ConfigError, FinetuneConfig
from jobs import data as data_lib
from jobs.models import Layout, hf_config, resolve_source


@dataclass
class Preflight:
    num_blocks: int
    num_train: int
    num_eval: int
    labels: list[str] | None


def preflight(cfg: FinetuneConfig) -> Preflight:
    cfg.check()
    if cfg.model.config_only:
        raise ConfigError(
            "model.config_only",
            f"{cfg.model.name} is an architecture without weights, for `graft plan`; to train "
            "it give its weights: model=hf model.path=<dir with config.json and safetensors>",
        )
    if cfg.strategy.name == "lora" and cfg.strategy.lora.quantize:
        raise ConfigError(
            "strategy.lora.quantize",
            "QLoRA training needs bitsandbytes on CUDA GPUs, which this build does not ship; "
            "`graft plan` estimates it; allowed here: null (16/32-bit LoRA)",
        )
    if cfg.model.arch is None:
        resolve_source(cfg.model)
    try:
        layout = Layout.of(hf_config(cfg.model))
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    k = cfg.strategy.num_trainable_blocks
    if k is not None and k > layout.num_blocks:
        raise ConfigError(
            "strategy.num_trainable_blocks",
            f"{k} is more than the model's {layout.num_blocks} blocks; allowed: 0..{layout.num_blocks}",
        )
    if cfg.strategy.name == "lora" and k == 0:
        raise ConfigError(
            "strategy.num_trainable_blocks", "lora needs >= 1 block to put adapters in, got 0"
        )
    dataset = data_lib.load(cfg.data)
    return Preflight(layout.num_blocks, len(dataset.train), len(dataset.eval), dataset.labels)
