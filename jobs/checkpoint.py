"""DeepSpeed checkpoints in the run directory, with a commit marker per rank.

Every rank writes straight into ``<run>/checkpoints/step_N`` (storage all workers see,
like the rest of the run directory), so a run needs no copy through Ray's storage and
several runs can share one Train gang.

A checkpoint directory holds DeepSpeed's files (tag ``ds``), one RNG state per rank,
``meta.json`` (step, world size, ZeRO stage, the run state: phase, best, ...) and a
``COMMITTED.rank<r>`` marker that each rank writes last. It is
complete only when every rank's marker is there; an incomplete one is never loaded.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "ds"
META = "meta.json"


def dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save(
    engine: Any, directory: Path, *, rank: int, world_size: int, state: dict[str, Any]
) -> None:
    """Every rank calls this (DeepSpeed's save is collective)."""
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"graft": state})
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    torch.save(rng, directory / f"rng.rank{rank}.pt")
    if rank == 0:
        meta = {
            "step": state["step"],
            "world_size": world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "state": state,
        }
        (directory / META).write_text(json.dumps(meta))
    (directory / f"COMMITTED.rank{rank}").touch()


def is_complete(directory: Path) -> bool:
    meta_file = directory / META
    if not meta_file.is_file():
        return False
    world_size = json.loads(meta_file.read_text())["world_size"]
    return all((directory / f"COMMITTED.rank{r}").is_file() for r in range(world_size))


def latest_complete(parent: Path) -> Path | None:
    """The newest complete checkpoint among ``parent/step_*``."""
    for candidate in sorted(parent.glob("step_*"), reverse=True):
        if is_complete(candidate):
            return candidate
    return None


def read_state(directory: Path) -> dict[str, Any]:
    """The run state a checkpoint holds (step, phase, ...), read without an engine; {}
    for a checkpoint written before meta.json carried it (one phase: ``load`` fills
    the state in)."""
    return dict(json.loads((directory / META).read_text()).get("state", {}))


def prune(parent: Path, *, keep: int, also: Iterable[int | None] = ()) -> list[Path]:
    """Remove all but the ``keep`` newest complete checkpoints under ``parent`` (and
    incomplete ones older than those); ``also``: steps kept whatever their age."""
    found = sorted(parent.glob("step_*"))
    complete = [d for d in found if is_complete(d)]
    kept = set(complete[-keep:]) | {parent / dir_name(s) for s in also if s is not None}
    newest = complete[-1] if complete else None
    removed = []
    for d in found:
        if d in kept or (newest is not None and d > newest):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def load(engine: Any, directory: Path, *, rank: int, world_size: int) -> dict[str, Any]:
    meta = json.loads((directory / META).read_text())
    if meta["world_size"] != world_size:
        raise ValueError(
            f"scaling.num_workers: checkpoint {directory} was written by {meta['world_size']} workers; "
            f"resume with scaling.num_workers={meta['world_size']} or start a new run.name"
        )
    _, client_state = engine.load_checkpoint(str(directory), tag=TAG)
    rng = torch.load(directory / f"rng.rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return dict(client_state["graft"])
