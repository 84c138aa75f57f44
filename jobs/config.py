"""Compose a Hydra config and turn it into the plain, validated dataclass workers get.

python -c "from jobs.config import compose; print(compose(['strategy=lora']).strategy)"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, OmegaConf

import conf.schema  # noqa: F401  registers the schemas in Hydra's ConfigStore
from conf.schema import ConfigError, FinetuneConfig


def compose(overrides: Sequence[str] = (), config_name: str = "finetune") -> FinetuneConfig:
    """The config ``graft finetune OVERRIDES`` would run, checked (raises ConfigError).
    ``config_name="sweep"`` composes ``graft sweep``'s config (conf/sweep.yaml)."""
    check_override_keys(overrides)
    with tempfile.TemporaryDirectory(prefix="graft-experiment-") as tmp:
        resolved = _experiment_overrides(overrides, Path(tmp))
        with initialize_config_module(version_base=None, config_module="conf"):
            node = hydra_compose(config_name=config_name, overrides=resolved)
        return to_plain(node)


CFG_PARTS = ("job", "hydra", "all")


def hydra_yaml(overrides: Sequence[str] = (), config_name: str = "finetune") -> str:
    """Hydra's own ``hydra:`` node for these overrides (what ``--cfg hydra`` prints):
    the run/sweep directories, the launcher and sweeper, the job's runtime; printed
    unresolved, as Hydra does."""
    check_override_keys(overrides)
    with tempfile.TemporaryDirectory(prefix="graft-experiment-") as tmp:
        resolved = _experiment_overrides(overrides, Path(tmp))
        with initialize_config_module(version_base=None, config_module="conf"):
            node = hydra_compose(
                config_name=config_name, overrides=resolved, return_hydra_config=True
            )
    return OmegaConf.to_yaml(OmegaConf.masked_copy(node, ["hydra"]))


def info(overrides: Sequence[str] = (), config_name: str = "finetune") -> str:
    """What Hydra's ``--info`` tells: where configs are searched, the option each group
    resolved to (the defaults list after the overrides), and the overrides applied."""
    check_override_keys(overrides)
    with tempfile.TemporaryDirectory(prefix="graft-experiment-") as tmp:
        resolved = _experiment_overrides(overrides, Path(tmp))
        with initialize_config_module(version_base=None, config_module="conf"):
            node = hydra_compose(
                config_name=config_name, overrides=resolved, return_hydra_config=True
            )
    runtime = node.hydra.runtime
    lines = [f"Config: {config_name}.yaml", "Config search path:"]
    for source in runtime.config_sources:
        lines.append(f"  {source.provider:<14} {source.schema}://{source.path}")
    lines.append("Groups (the defaults list, after the overrides):")
    for group, option in sorted(runtime.choices.items()):
        if not str(group).startswith("hydra"):
            lines.append(f"  {group}={option}")
    lines.append("Overrides:" + ("" if overrides else " (none)"))
    lines += [f"  {o}" for o in overrides]
    return "\n".join(lines)


def _leaf_type(hint: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, False


def check_override_keys(overrides: Sequence[str]) -> None:
    """Every dotted override names a key of the schema (with "did you mean ...?" for a
    typo, also after ``+``: Hydra would add an unknown key that nothing reads), and a
    number or flag key gets a value of its type. Keys under free-form fields (dicts,
    lists, ``Any``) and group choices (``model=x``) are Hydra's to check."""
    import difflib

    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        parts = key.split(".")
        if not sep or len(parts) < 2 or parts[0] in ("hydra", "experiment"):
            continue
        node: Any = FinetuneConfig
        for depth, part in enumerate(parts):
            hint, nullable = _leaf_type(node)
            if not dataclasses.is_dataclass(hint):
                break  # free-form below here
            hints = typing.get_type_hints(hint)
            if part not in hints:
                where = ".".join(parts[:depth])
                close = difflib.get_close_matches(part, list(hints), n=1, cutoff=0.6)
                guess = f"did you mean `{where}.{close[0]}`? " if close else ""
                raise ConfigError(
                    key,
                    f"no such key; {guess}{where} has: {', '.join(sorted(hints))}"
                    + (" (a + does not add keys graft reads)" if override.startswith("+") else ""),
                )
            node = hints[part]
        else:
            _check_value(key, value, node)


def _check_value(key: str, value: str, hint: Any) -> None:
    leaf, nullable = _leaf_type(hint)
    text = value.strip()
    if text.startswith("${") or (nullable and text.lower() in ("null", "none", "~")):
        return
    kinds = {int: "an integer", float: "a number", bool: "true or false"}
    if leaf not in kinds:
        return
    try:
        if leaf is bool:
            ok = text.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")
        elif leaf is int:
            int(text)
            ok = True
        else:
            float(text)
            ok = True
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            key,
            f"{value!r} is not {kinds[leaf]}; {key} takes {kinds[leaf]}"
            + (" or null" if nullable else ""),
        )


def _experiment_overrides(overrides: Sequence[str], tmp: Path) -> list[str]:
    """``experiment=NAME`` and ``+experiment=NAME`` both select conf/experiment/NAME.yaml
    (the defaults list has an ``experiment: null`` slot, so the ``+`` is optional).
    A value that is a YAML file's path (a sweep's report/best.yaml) works too: the file
    is put on Hydra's search path as experiment/<stem>.yaml."""
    out: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in ("experiment", "+experiment"):
            path = Path(value).expanduser()
            if value.endswith((".yaml", ".yml")) or "/" in value:
                if not path.is_file():
                    raise ValueError(f"experiment: no such experiment file {value!r}")
                (tmp / "experiment").mkdir(exist_ok=True)
                (tmp / "experiment" / f"{path.stem}.yaml").write_text(path.read_text())
                out.append(f"hydra.searchpath=[file://{tmp}]")
                value = path.stem
            out.append(f"experiment={value}")
        else:
            out.append(override)
    return out


def to_plain(node: DictConfig) -> FinetuneConfig:
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, FinetuneConfig), type(cfg)
    cfg.check()
    return cfg


def load_saved(directory: Path) -> FinetuneConfig:
    """The config a run or sweep directory was started with (its config.yaml), over the
    schema's defaults (a key added to graft since then takes its default)."""
    node = OmegaConf.merge(
        OmegaConf.structured(FinetuneConfig), OmegaConf.load(Path(directory) / "config.yaml")
    )
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, FinetuneConfig)
    return cfg


def to_yaml(cfg: FinetuneConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys that do not change what is trained: they stay out of the derived run name.
_NOT_IN_NAME = ("run", "cluster", "sweep")
_TRAIN_NOT_IN_NAME = ("max_failures",)


def _non_default(obj: Any) -> Any:
    """A config as a dict of only what differs from the schema's defaults: a key added to
    the schema later (at its default) leaves existing runs' names, and so their resume,
    as they were."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(value):
            trimmed = _non_default(value)
            if trimmed:
                out[f.name] = trimmed
        elif value != default:
            out[f.name] = [_non_default(v) for v in value] if isinstance(value, list) else value
    return out


def run_name(cfg: FinetuneConfig) -> str:
    """``run.name``, or model-data-strategy-<hash of the config>: a rerun of the same
    command finds the same directory (and resumes from its checkpoints)."""
    if cfg.run.name:
        return cfg.run.name
    content = {
        k: v for k, v in _non_default(cfg).items() if k not in _NOT_IN_NAME and v is not None
    }
    for key in _TRAIN_NOT_IN_NAME:
        content.get("train", {}).pop(key, None)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[
        :8
    ]
    return f"{cfg.model.name}-{cfg.data.name}-{cfg.strategy.name}-{digest}"


def with_run_name(cfg: FinetuneConfig) -> FinetuneConfig:
    return replace(cfg, run=replace(cfg.run, name=run_name(cfg)))
