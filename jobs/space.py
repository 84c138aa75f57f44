"""A sweep's search space: checked against the config, sampled with Optuna, applied.

    python -c "from jobs.config import compose; from jobs.space import check_space; \
        c = compose([], 'sweep'); print(check_space(c, num_blocks=6))"

``sweep.space`` (conf/sweep/<name>.yaml) maps a parameter name (what Optuna, plots and
tables call it) to a ParamSpec: the config key it sets, its distribution, and an
optional ``when`` condition on earlier parameters. Sampling is define-by-run, so a
parameter whose condition does not hold is simply not part of that trial.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from omegaconf import OmegaConf

from conf.schema import STRATEGIES, ConfigError, FinetuneConfig, ParamSpec, SweepConfig

# Sections a trial may not change: they decide where and how big the sweep runs.
FIXED_SECTIONS = ("run", "cluster", "scaling", "sweep")
# The int parameter whose missing upper bound means "the model's block count".
BLOCKS_KEYS = ("strategy.num_trainable_blocks", "strategy.progressive.final_blocks")


# A loss term's knob, addressed by the term's name: objectives.<name>.weight or
# objectives.<name>.args.<arg> (the list index is found in the trial's config).
TERM_KEY = "objectives."


def _term_path(cfg: FinetuneConfig, key: str) -> str:
    """``objectives.<name>.<rest>`` as the OmegaConf path ``objectives.<i>.<rest>``;
    ConfigError unless the config has that term and <rest> is weight or args.<arg>."""
    _, name, *rest = key.split(".")
    names = [t.name for t in cfg.objectives]
    if name not in names:
        raise ConfigError(
            "key",
            f"{key!r}: no loss term {name!r} in objectives (the config has {names or 'none'}); "
            "add it to objectives to sweep its knobs",
        )
    if rest != ["weight"] and not (len(rest) >= 2 and rest[0] == "args"):
        raise ConfigError(
            "key",
            f"{key!r}: a loss term's knobs are objectives.{name}.weight or objectives.{name}.args.<arg>",
        )
    index = names.index(name)
    # A nested arg (a task's weight) must be inside what the term already has: the
    # trial would otherwise add, say, a task that has no data.
    node: Any = cfg.objectives[index].args
    for i, part in enumerate(rest[1:-1], start=1):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(["objectives", name, *rest[:i]])
            have = sorted(node) if isinstance(node, dict) else "a value"
            raise ConfigError("key", f"{key!r}: {where} has no {part!r} (it has {have})")
        node = node[part]
    return ".".join(["objectives", str(index), *rest])


def _check_key(key: str) -> None:
    """ConfigError unless ``key`` is a dotted path to a value of FinetuneConfig."""
    if key.startswith(TERM_KEY):
        return  # checked against the config's terms (_term_path)
    node: Any = FinetuneConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(hints)) or "nothing (it is a value)"
            raise ConfigError("key", f"{key!r} is not a config key: {where} has {known}")
        node = next(
            (
                t
                for t in (hints[part], *typing.get_args(hints[part]))
                if dataclasses.is_dataclass(t)
            ),
            None,
        )
    if node is not None:
        raise ConfigError("key", f"{key!r} is a section, not a value")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_param(name: str, spec: ParamSpec, num_blocks: int, seen: dict[str, ParamSpec]) -> None:
    where = f"sweep.space.{name}"
    try:
        _check_key(spec.key)
    except ConfigError as e:
        raise ConfigError(f"{where}.key", str(e).split(": ", 1)[1]) from None
    if spec.key.split(".")[0] in FIXED_SECTIONS:
        raise ConfigError(
            f"{where}.key",
            f"{spec.key!r} cannot be searched: {', '.join(FIXED_SECTIONS)} are fixed for the whole sweep",
        )
    if spec.type not in ("int", "float", "log_float", "categorical"):
        raise ConfigError(
            f"{where}.type",
            f"{spec.type!r} is not one of 'int', 'float', 'log_float', 'categorical'",
        )
    if spec.type == "categorical":
        if spec.low is not None or spec.high is not None:
            raise ConfigError(f"{where}.low", "a categorical parameter takes choices, not low/high")
        if not spec.choices:
            raise ConfigError(f"{where}.choices", "is empty: give at least one choice")
        if len(set(map(repr, spec.choices))) != len(spec.choices):
            raise ConfigError(f"{where}.choices", f"has duplicates: {spec.choices}")
        for choice in spec.choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise ConfigError(
                    f"{where}.choices", f"{choice!r}: choices must be numbers, strings or booleans"
                )
        if spec.key == "strategy.name":
            for choice in spec.choices:
                if choice not in STRATEGIES:
                    raise ConfigError(
                        f"{where}.choices",
                        f"{choice!r} is not a strategy; allowed: {', '.join(STRATEGIES)}",
                    )
    else:
        if spec.choices is not None:
            raise ConfigError(f"{where}.choices", f"a {spec.type} parameter takes low/high")
        if spec.high is None and spec.key in BLOCKS_KEYS:
            spec.high = num_blocks
        for bound in ("low", "high"):
            value = getattr(spec, bound)
            if value is None or not _is_number(value):
                raise ConfigError(f"{where}.{bound}", f"a {spec.type} parameter needs a number")
        assert spec.low is not None and spec.high is not None
        if spec.low > spec.high:
            raise ConfigError(f"{where}.low", f"low {spec.low:g} is more than high {spec.high:g}")
        if spec.type == "log_float" and spec.low <= 0:
            raise ConfigError(f"{where}.low", f"a log_float needs low > 0, got {spec.low:g}")
        if spec.type == "int":
            for bound in ("low", "high"):
                if float(getattr(spec, bound)) != int(getattr(spec, bound)):
                    raise ConfigError(f"{where}.{bound}", "an int parameter needs whole numbers")
        if spec.step is not None and spec.step <= 0:
            raise ConfigError(f"{where}.step", f"must be > 0, got {spec.step}")
        if spec.key in BLOCKS_KEYS and spec.high > num_blocks:
            raise ConfigError(
                f"{where}.high",
                f"{spec.high:g} is more than the model's {num_blocks} blocks; allowed: 0..{num_blocks}",
            )
        if spec.key == "strategy.lr_ratio" and not (0 < spec.low and spec.high <= 1):
            raise ConfigError(
                f"{where}.low",
                f"strategy.lr_ratio must stay in (0, 1], got [{spec.low:g}, {spec.high:g}]",
            )
    for dep, allowed in (spec.when or {}).items():
        if dep == name or dep not in seen:
            raise ConfigError(
                f"{where}.when",
                f"{dep!r} must be a parameter listed before {name!r}; earlier: {', '.join(seen) or 'none'}",
            )
        parent = seen[dep]
        if not allowed:
            raise ConfigError(f"{where}.when.{dep}", "is empty: list the values it applies to")
        if parent.type == "categorical":
            assert parent.choices is not None
            for value in allowed:
                if value not in parent.choices:
                    raise ConfigError(
                        f"{where}.when.{dep}",
                        f"{value!r} is not one of {dep}'s choices {parent.choices}",
                    )


def check_space(cfg: FinetuneConfig, *, num_blocks: int) -> dict[str, ParamSpec]:
    """Validate ``cfg.sweep`` against the config and the model; returns the space with
    bounds filled in. Raises ConfigError naming the key."""
    sweep = cfg.sweep
    assert sweep is not None
    seen: dict[str, ParamSpec] = {}
    keys: dict[str, list[str]] = {}
    for name, spec in sweep.space.items():
        # One key may have several parameters only under conditions no trial meets at
        # once (an lr range per strategy): each trial still sets the key at most once.
        for other in keys.get(spec.key, []):
            if not _exclusive(spec, seen[other]):
                raise ConfigError(
                    f"sweep.space.{name}.key",
                    f"{spec.key!r} is already set by {other!r}; two parameters may share a key "
                    "only when their `when` conditions on the same parameter have no value in common",
                )
        _check_param(name, spec, num_blocks, seen)
        if spec.key.startswith(TERM_KEY):
            try:
                _term_path(cfg, spec.key)
            except ConfigError as e:
                raise ConfigError(f"sweep.space.{name}.key", str(e).split(": ", 1)[1]) from None
        if spec.key == "strategy.progressive.unfreeze_every" and spec.high is not None:
            if spec.high >= cfg.train.max_steps:
                raise ConfigError(
                    f"sweep.space.{name}.high",
                    f"{spec.high:g} steps between unfreezes is not below train.max_steps="
                    f"{cfg.train.max_steps}; allowed: up to {cfg.train.max_steps - 1}",
                )
        seen[name] = spec
        keys.setdefault(spec.key, []).append(name)
    for i, params in enumerate(sweep.enqueue):
        for name, value in params.items():
            if name not in seen:
                raise ConfigError(
                    f"sweep.enqueue[{i}].{name}",
                    f"not a parameter of the space; known: {', '.join(seen)}",
                )
            if not _within(seen[name], value):
                raise ConfigError(f"sweep.enqueue[{i}].{name}", f"{value!r} is outside its range")
            when = seen[name].when or {}
            if all(dep in params for dep in when) and not _applies(seen[name], params):
                # The trial would silently ignore it (and sample the parameter that applies).
                condition = ", ".join(f"{dep} in {list(allowed)}" for dep, allowed in when.items())
                given = ", ".join(f"{dep}={params[dep]!r}" for dep in when)
                raise ConfigError(
                    f"sweep.enqueue[{i}].{name}",
                    f"does not apply to this point ({given}): {name} is sampled only when {condition}",
                )
    return seen


def _exclusive(a: ParamSpec, b: ParamSpec) -> bool:
    """True when no trial can meet both conditions: both name a parameter whose allowed
    values do not overlap."""
    wa, wb = a.when or {}, b.when or {}
    return any(
        not set(map(repr, wa[dep])) & set(map(repr, wb[dep])) for dep in wa.keys() & wb.keys()
    )


def _within(spec: ParamSpec, value: Any) -> bool:
    if spec.type == "categorical":
        return value in (spec.choices or [])
    assert spec.low is not None and spec.high is not None
    return _is_number(value) and spec.low <= value <= spec.high


def _applies(spec: ParamSpec, params: dict[str, Any]) -> bool:
    return all(params.get(dep, _ABSENT) in allowed for dep, allowed in (spec.when or {}).items())


_ABSENT = object()


def sample(trial: Any, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Draw one trial's parameters (define-by-run: conditional ones only when they apply).
    On an enqueued or retried Optuna trial the fixed values come back unchanged."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if not _applies(spec, params):
            continue
        if spec.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec.choices or []))
        elif spec.type == "int":
            assert spec.low is not None and spec.high is not None
            params[name] = trial.suggest_int(
                name, int(spec.low), int(spec.high), step=int(spec.step or 1)
            )
        else:
            assert spec.low is not None and spec.high is not None
            params[name] = trial.suggest_float(
                name,
                float(spec.low),
                float(spec.high),
                log=spec.type == "log_float",
                step=spec.step if spec.type == "float" else None,
            )
    return params


def apply(
    base: FinetuneConfig, space: dict[str, ParamSpec], params: dict[str, Any]
) -> FinetuneConfig:
    """The trial's config: ``base`` with each parameter's value at its key, checked."""
    node = OmegaConf.structured(dataclasses.replace(base, sweep=None))
    for name, value in params.items():
        if name not in space:
            raise ConfigError(f"sweep.space.{name}", "not a parameter of the space")
        spec = space[name]
        if spec.type == "int":
            value = int(value)
        elif spec.type in ("float", "log_float"):
            value = float(value)
        key = _term_path(base, spec.key) if spec.key.startswith(TERM_KEY) else spec.key
        OmegaConf.update(node, key, value, merge=False)
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, FinetuneConfig)
    cfg.check()
    return cfg


def evaluations(cfg: FinetuneConfig) -> int:
    """How many evaluations a full-length trial makes (the scheduler's time unit)."""
    return math.ceil(cfg.train.max_steps / cfg.train.eval_every)


def trial_base(cfg: FinetuneConfig) -> FinetuneConfig:
    """What every trial starts from: the config without its sweep section, cut to
    sweep.max_t evaluations when that is less than a full run, without the evaluation
    before training (it ranks nothing: the scheduler sees evaluations 1..max_t) and
    without an export."""
    assert cfg.sweep is not None
    train = dataclasses.replace(cfg.train, eval_at_start=False)
    if cfg.sweep.max_t is not None and cfg.sweep.max_t < evaluations(cfg):
        train = dataclasses.replace(train, max_steps=cfg.sweep.max_t * train.eval_every)
    return dataclasses.replace(
        cfg, sweep=None, train=train, run=dataclasses.replace(cfg.run, export=False)
    )


def full_base(cfg: FinetuneConfig) -> FinetuneConfig:
    """``trial_base`` at the full train.max_steps (retrained best, baselines), exported
    as the user asked."""
    return dataclasses.replace(trial_base(cfg), train=cfg.train, run=cfg.run)


def describe(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


__all__ = ["SweepConfig", "apply", "check_space", "describe", "evaluations", "sample", "trial_base"]
