"""DeepSpeed checkpoints in the run directory, with a commit marker per rank.

Every rank writes straight into ``<run>/checkpoints/step_N`` (storage all workers see,
like the rest of the run directory), so a run needs no copy through Ray's storage and
several runs can share one Train gang.

A checkpoint directory holds DeepSpeed's files (tag ``ds``), one RNG state per rank,
``meta.json`` (step, world size, ZeRO stage, the run state: phase, best, ...), a
``MANIFEST.rank<r>.json`` per rank (size and SHA-256 of its share of the files) and a
``COMMITTED.rank<r>`` marker that each rank writes last. It is complete only when every
rank's marker is there; an incomplete one is never loaded. A complete one is *usable*
when every file its manifests list is there with its size (the driver's quick check,
``problems(..., full=False)``) and its checksum (the workers', each rank hashing its
share before a resume): a truncated or corrupt checkpoint is skipped, with a warning
naming the file, for the newest one before it; none usable fails the run loudly (never
a silent restart from step 0). The directory listing plus these files is graft's whole
checkpoint index: moving a checkpoint away, or deleting one, needs nothing else updated.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "ds"
META = "meta.json"


def dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save(
    engine: Any,
    directory: Path,
    *,
    rank: int,
    world_size: int,
    state: dict[str, Any],
    micro_batch_size: int,
    grad_accum_steps: int,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Every rank calls this (DeepSpeed's save is collective; ``barrier`` waits for every
    rank's files before each hashes its share of them). ``micro_batch_size`` and
    ``grad_accum_steps`` (with the world size: the global batch, and where the data
    order stands) let a resume on another world size keep both."""
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
            "micro_batch_size": micro_batch_size,
            "grad_accum_steps": grad_accum_steps,
            "zero_stage": engine.zero_optimization_stage(),
            "state": state,
        }
        (directory / META).write_text(json.dumps(meta))
    barrier()
    write_manifest(directory, rank=rank, world_size=world_size)
    (directory / f"COMMITTED.rank{rank}").touch()


MANIFEST = "MANIFEST.rank{rank}.json"


def _listed(directory: Path) -> list[str]:
    """The checkpoint's data files (not its markers or manifests), relative, sorted."""
    return sorted(
        str(f.relative_to(directory))
        for f in directory.rglob("*")
        if f.is_file() and not f.name.startswith(("COMMITTED.", "MANIFEST."))
    )


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, *, rank: int, world_size: int) -> None:
    """Rank ``rank``'s share of the files (every world_size-th): size and checksum."""
    mine = _listed(directory)[rank::world_size]
    entries = {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
        for name in mine
    }
    (directory / MANIFEST.format(rank=rank)).write_text(json.dumps(entries, indent=0))


def manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    """Every rank's manifest entries together; None for a checkpoint written before
    manifests (it is loaded unverified)."""
    parts = sorted(directory.glob("MANIFEST.rank*.json"))
    if not parts:
        return None
    entries: dict[str, dict[str, Any]] = {}
    for part in parts:
        try:
            entries.update(json.loads(part.read_text()))
        except (OSError, ValueError):
            entries[part.name] = {"size": -1, "sha256": ""}  # (reported as damaged)
    return entries


def problems(directory: Path, *, full: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a complete checkpoint's files: missing, a size that is not the
    recorded one, and (``full``) a checksum that is not; only the ``share`` = (rank,
    world) part of the files is read (every rank checks its part). [] = usable."""
    entries = manifest(directory)
    if entries is None:
        return []
    rank, world = share
    found = []
    for name in sorted(entries)[rank::world]:
        expected, path = entries[name], directory / name
        if not path.is_file():
            found.append(f"{path}: missing")
        elif (size := path.stat().st_size) != expected["size"]:
            found.append(f"{path}: {size} bytes, the manifest says {expected['size']} (truncated?)")
        elif full and sha256(path) != expected["sha256"]:
            found.append(f"{path}: its checksum is not the manifest's (corrupt)")
    return found


def is_complete(directory: Path) -> bool:
    meta_file = directory / META
    if not meta_file.is_file():
        return False
    world_size = json.loads(meta_file.read_text())["world_size"]
    return all((directory / f"COMMITTED.rank{r}").is_file() for r in range(world_size))


def complete(parent: Path) -> list[Path]:
    """The complete checkpoints among ``parent/step_*``, newest first."""
    return [d for d in sorted(parent.glob("step_*"), reverse=True) if is_complete(d)]


def latest_complete(parent: Path) -> Path | None:
    """The newest complete checkpoint among ``parent/step_*``."""
    found = complete(parent)
    return found[0] if found else None


class NoUsableCheckpoint(RuntimeError):
    """Complete checkpoints exist but every one is damaged: the run must not restart
    from step 0 over them."""


def latest_usable(
    parent: Path, *, full: bool = False, warn: Callable[[str], None] = print
) -> Path | None:
    """The newest complete checkpoint whose files pass ``problems`` (sizes; checksums
    too with ``full``), each skipped one warned about with its files; None when there
    is no complete checkpoint; NoUsableCheckpoint when there are and none is usable."""
    found = complete(parent)
    damaged = []
    for candidate in found:
        wrong = problems(candidate, full=full)
        if not wrong:
            return candidate
        damaged.append(f"{candidate.name}: {'; '.join(wrong)}")
        warn(f"graft: skipping damaged checkpoint {candidate}: {'; '.join(wrong)}")
    if found:
        raise no_usable(parent, damaged)
    return None


def no_usable(parent: Path, damaged: list[str]) -> NoUsableCheckpoint:
    return NoUsableCheckpoint(
        f"no usable checkpoint in {parent}: every complete one is damaged ("
        + " | ".join(damaged)
        + "); not restarting from step 0 over them: restore the files, or move "
        f"{parent} away to start the run afresh"
    )


def read_meta(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / META).read_text()))


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


UNIVERSAL = "universal"


def needs_universal(directory: Path, *, world_size: int) -> bool:
    """A checkpoint written by another number of workers under ZeRO 1-3 (whose optimizer
    state is partitioned per worker) is loaded through DeepSpeed's universal format."""
    meta = read_meta(directory)
    return int(meta["world_size"]) != world_size and int(meta.get("zero_stage", 0)) > 0


def to_universal(directory: Path) -> Path:
    """DeepSpeed's universal checkpoint (``ds_to_universal``: every parameter's fp32
    weights and optimizer moments whole, in ``<checkpoint>/universal``) made from the
    checkpoint's per-worker shards, once; a half-made one (a crash) is made again. One
    rank calls this while the others wait."""
    out = directory / UNIVERSAL
    done = out / "DONE"
    if done.is_file():
        return out
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    work = directory / f"{UNIVERSAL}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(directory / TAG),
        output_folder=str(work),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # (graft trains no tensor-parallel slices to describe)
    )
    try:
        ds_to_universal.main(args)
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {directory}: DeepSpeed's universal conversion failed ({type(e).__name__}: "
            f"{e}); resume it on its own {read_meta(directory)['world_size']} workers "
            "(scaling.num_workers)"
        ) from e
    (directory / "latest_universal").unlink(missing_ok=True)  # (written by the converter)
    work.rename(out)
    done.touch()
    return out


def load(
    engine: Any,
    directory: Path,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Restore a checkpoint into an engine, and this rank's RNG. On another world size
    (``needs_universal``) rank 0 makes the ``to_universal`` copy while the others wait
    at ``barrier``, and every rank loads that (a new rank takes the RNG of the rank its
    number wraps to). Every rank calls this (DeepSpeed's load is collective)."""
    meta = json.loads((directory / META).read_text())
    universal = needs_universal(directory, world_size=world_size)
    if universal:
        if rank == 0:
            to_universal(directory)
        barrier()
    config = engine._config  # (DeepSpeed reads this flag only while loading)
    was = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    try:
        _, client_state = engine.load_checkpoint(
            str(directory), tag=UNIVERSAL if universal else TAG
        )
    except Exception as e:  # (a damage the manifest could not see: an older checkpoint)
        raise RuntimeError(
            f"checkpoint {directory} could not be loaded ({type(e).__name__}: {e}); move it "
            "away to resume from the one before"
        ) from e
    finally:
        config.load_universal_checkpoint = was
    rng = torch.load(directory / f"rng.rank{rank % int(meta['world_size'])}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return dict(client_state["graft"])
