"""Sizes and counts as `graft plan` reads and prints them."""

from __future__ import annotations

import re

from conf.schema import ConfigError

GiB = 2**30
# QLoRA's nf4 weights: 4 bits plus one fp32 absmax per 64 weights, itself quantized to
# 8 bits with a second-level constant per 256 blocks (double quantization).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Adam keeps two fp32 moments per trainable parameter.
ADAM_BYTES = 8


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '24 GiB', '1.5TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError("--gpu-memory", f"{text!r} is not a size like 80GiB, 40GB or 24GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def fmt(nbytes: float) -> str:
    return f"{nbytes / GiB:,.2f} GiB" if nbytes >= GiB / 100 else f"{nbytes / 2**20:,.2f} MiB"
