"""Compose a Hydra config and turn it into the plain, validated dataclass workers get.

python -c "from jobs.config import compose; print(compose(['strategy=lora']).strategy)"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, OmegaConf

import conf.schema  # noqa: F401  registers the schemas in Hydra's ConfigStore
from conf.schema import FinetuneConfig


def compose(overrides: Sequence[str] = (), config_name: str = "finetune") -> FinetuneConfig:
    """The config ``graft finetune OVERRIDES`` would run, checked (raises ConfigError)."""
    with initialize_config_module(version_base=None, config_module="conf"):
        node = hydra_compose(config_name=config_name, overrides=list(overrides))
    return to_plain(node)


def to_plain(node: DictConfig) -> FinetuneConfig:
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, FinetuneConfig), type(cfg)
    cfg.check()
    return cfg


def to_yaml(cfg: FinetuneConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys that do not change what is trained: they stay out of the derived run name.
_NOT_IN_NAME = ("run", "cluster")


def run_name(cfg: FinetuneConfig) -> str:
    """``run.name``, or model-data-strategy-<hash of the config>: a rerun of the same
    command finds the same directory (and resumes from its checkpoints)."""
    if cfg.run.name:
        return cfg.run.name
    content = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_NAME}
    content["train"] = {k: v for k, v in content["train"].items() if k != "fail_at_step"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[
        :8
    ]
    return f"{cfg.model.name}-{cfg.data.name}-{cfg.strategy.name}-{digest}"


def with_run_name(cfg: FinetuneConfig) -> FinetuneConfig:
    return replace(cfg, run=replace(cfg.run, name=run_name(cfg)))
