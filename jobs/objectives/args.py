"""What every term's ``args`` check shares: the allowed keys, the required ones, types."""

from __future__ import annotations

from typing import Any

from conf.schema import ConfigError


def check_keys(
    term: str, index: int, args: dict[str, Any], allowed: set[str], required: dict[str, str]
) -> str:
    """ConfigError for an unknown key or a missing required one (``required``: key ->
    what to give); returns the args' config key, ``objectives[i].args``."""
    key = f"objectives[{index}].args"
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ConfigError(key, f"{term} takes {sorted(allowed)}, got unknown {unknown}")
    for name, needed in required.items():
        if not args.get(name):
            raise ConfigError(f"{key}.{name}", needed)
    return key


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
