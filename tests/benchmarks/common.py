"""What the benchmarks share: a fresh run of a config, timed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from jobs.config import compose


def fresh_run(name: str, overrides: list[str], out: Path) -> tuple[Any, float]:
    """``graft finetune`` in this process as ``out/name`` (removed first: a fresh run,
    never a resume); its Summary and wall seconds."""
    from jobs.finetune import run

    shutil.rmtree(out / name, ignore_errors=True)
    started = time.time()
    summary = run(
        compose(overrides + [f"run.output_dir={out}", f"run.name={name}"]), show_progress=False
    )
    return summary, time.time() - started


def metrics_of(summary: Any, wall: float, keys: tuple[str, ...]) -> dict[str, Any]:
    """A table row: the run's final ``keys``, its wall time and directory."""
    return {
        **{k: summary.metrics.get(k) for k in keys},
        "wall_s": wall,
        "run_dir": str(summary.run_dir),
    }


def one_eval_schedule(steps: int, micro_batch: int) -> list[str]:
    """``steps`` steps, linear decay after 10 % warm-up, ZeRO-2; one evaluation and one
    checkpoint, at the end."""
    return [
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        f"train.warmup_steps={steps // 10}",
        "train.schedule=linear",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.log_every=10",
        "deepspeed=zero2",
    ]
