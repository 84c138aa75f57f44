"""The plan as rich tables (and as JSON)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jobs import tasks
from jobs.plan.checks import Plan
from jobs.plan.recommend import Option
from jobs.plan.units import _count, fmt


# --------------------------------------------------------------------------- output
def _rows(plan: Plan) -> list[tuple[str, int]]:
    m = plan.memory
    ckpt = "with" if plan.cfg.model.activation_checkpointing else "without"
    rows = [
        ("parameters", m.params),
        ("gradients", m.grads),
        ("optimizer states", m.optimizer),
    ]
    if m.terms:
        rows.append(("loss terms (frozen: references, Fisher, teacher)", m.terms))
    if m.gathered:
        rows.append(("gathered layer (ZeRO-3)", m.gathered))
    if m.buckets:
        rows.append(("reduce bucket", m.buckets))
    rows.append((f"activations ({ckpt} checkpointing)", m.activations))
    return rows


def to_dict(plan: Plan, options: list[Option] | None = None) -> dict[str, Any]:
    c, m = plan.counts, plan.memory
    return {
        "model": plan.cfg.model.name,
        "strategy": plan.cfg.strategy.name,
        "zero_stage": plan.cfg.deepspeed.stage,
        "bf16": plan.cfg.deepspeed.bf16,
        "world_size": plan.world,
        "micro_batch_size": plan.cfg.train.micro_batch_size,
        "seq_len": plan.activations.seq_len,
        "params": {"total": c.total, "trainable": c.trainable, "largest_layer": c.largest_layer},
        "memory_bytes": {
            **dataclasses.asdict(m),
            "model_states": m.model_states,
            "total": m.total,
            "total_with_checkpointing": plan.memory_checkpointed,
        },
        "device_bytes": plan.device_bytes,
        "fits": plan.fits,
        "ok": plan.ok,
        "checks": [dataclasses.asdict(ch) for ch in plan.checks],
        "recommend": [dataclasses.asdict(o) for o in options or []],
    }


def render(
    plan: Plan,
    console: Any,
    *,
    options: list[Option] | None = None,
    overrides: Sequence[str] = (),
) -> None:
    """The plan as rich tables: memory per device, checks, and (--recommend) options."""
    from rich.table import Table

    cfg, c, m = plan.cfg, plan.counts, plan.memory
    share = c.trainable / c.total if c.total else 0.0
    precision = "bf16" if cfg.deepspeed.bf16 else cfg.model.dtype
    offload = [
        name
        for name, on in (
            ("optimizer", cfg.deepspeed.offload_optimizer),
            ("params", cfg.deepspeed.offload_params),
        )
        if on
    ]
    console.print(
        f"graft plan: {cfg.model.name} ({_count(c.total)} parameters, {c.num_blocks} blocks), "
        f"strategy {cfg.strategy.name}: {c.trainable:,} trainable ({share:.2%}); "
        f"ZeRO-{cfg.deepspeed.stage}{' + offload ' + '/'.join(offload) if offload else ''}, "
        f"{precision}, {plan.world} ranks, micro batch {cfg.train.micro_batch_size} x "
        + tasks.get(cfg.model).describe_input(plan.activations.seq_len)
    )
    table = Table(title="memory per device", title_justify="left")
    table.add_column("")
    table.add_column("size", justify="right")
    for label, nbytes in _rows(plan):
        table.add_row(label, fmt(nbytes))
    table.add_row("[bold]total[/bold]", f"[bold]{fmt(m.total)}[/bold]")
    console.print(table)
    if plan.device_bytes is not None:
        verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
        console.print(
            f"{verdict}: {fmt(m.total)} of {fmt(plan.device_bytes)} per device "
            f"({m.total / plan.device_bytes:.0%})"
        )
    other = "on" if not cfg.model.activation_checkpointing else "off"
    alt = (
        plan.memory_checkpointed
        if other == "on"
        else m.model_states + m.buffers + plan.activations.bytes(cfg.train.micro_batch_size, False)
    )
    console.print(f"with activation checkpointing {other}: {fmt(alt)} per device")
    if m.host:
        console.print(f"host (CPU) memory for offloaded states: {fmt(m.host)} per rank")
    styles = {"ok": "green", "warn": "yellow", "error": "red"}
    for check in plan.checks:
        style = styles[check.level]
        console.print(f"[{style}]{check.level:5}[/{style}] {check.key}: {check.message}")
    if options is None:
        return
    if not options:
        console.print(
            f"[red]no configuration fits {fmt(plan.device_bytes or 0)} per device[/red] on "
            f"{plan.world} ranks (tried ZeRO 0-3, offload, checkpointing, smaller micro batches, "
            "LoRA and freezing); add GPUs (--num-gpus) or shorten data.max_length"
        )
        return
    table = Table(title="cheapest configurations that fit (--recommend)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("overrides")
    table.add_column("per device", justify="right")
    table.add_column("cost", justify="right")
    for i, option in enumerate(options, 1):
        table.add_row(
            str(i),
            " ".join(option.overrides) or "(as configured)",
            fmt(option.total),
            f"{option.cost:.2f}",
        )
    console.print(table)
    console.print(
        "cost: rough relative slowdown (ZeRO-3 0.2, optimizer offload 1, parameter offload "
        "+1.5, checkpointing 0.33, each micro-batch halving 0.1, changing what trains 3)"
    )
    console.print(f"paste: graft finetune {' '.join(merge(overrides, options[0].overrides))}")


def merge(overrides: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``overrides`` then ``extra``, dropping the overrides ``extra`` sets again (Hydra
    refuses two values for one key)."""

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    replaced = {key(o) for o in extra}
    return [o for o in overrides if key(o) not in replaced] + list(extra)
