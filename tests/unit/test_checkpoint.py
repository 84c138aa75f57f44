"""A checkpoint is complete only when every rank committed; incomplete ones are skipped."""

from __future__ import annotations

import json
from pathlib import Path

from jobs import checkpoint as ckpt


def _plant(parent: Path, step: int, *, world: int, committed: list[int]) -> Path:
    d = parent / ckpt.dir_name(step)
    d.mkdir(parents=True)
    (d / ckpt.META).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": 3}))
    for r in committed:
        (d / f"COMMITTED.rank{r}").touch()
    return d


def test_latest_complete_skips_half_written_checkpoints(tmp_path: Path) -> None:
    good = _plant(tmp_path, 10, world=2, committed=[0, 1])
    half = _plant(tmp_path, 20, world=2, committed=[0])
    assert ckpt.is_complete(good) and not ckpt.is_complete(half)
    assert ckpt.latest_complete(tmp_path) == good
    (tmp_path / ckpt.dir_name(30)).mkdir()  # no meta at all
    assert ckpt.latest_complete(tmp_path) == good
    _plant(tmp_path, 40, world=2, committed=[0, 1])
    assert ckpt.latest_complete(tmp_path).name == ckpt.dir_name(40)  # type: ignore[union-attr]


def test_nothing_complete_means_a_fresh_start(tmp_path: Path) -> None:
    _plant(tmp_path, 5, world=4, committed=[0, 1, 2])
    assert ckpt.latest_complete(tmp_path) is None


def test_run_state_and_pruning(tmp_path: Path) -> None:
    old = _plant(tmp_path, 5, world=2, committed=[0, 1])
    assert ckpt.read_state(old) == {}  # written before meta.json held the state
    meta = json.loads((old / ckpt.META).read_text())
    (old / ckpt.META).write_text(json.dumps({**meta, "state": {"step": 5, "phase": 1}}))
    assert ckpt.read_state(old) == {"step": 5, "phase": 1}
    for step in (10, 15, 20):
        _plant(tmp_path, step, world=2, committed=[0, 1])
    half = _plant(tmp_path, 25, world=2, committed=[0])  # a newer, half-written one
    removed = ckpt.prune(tmp_path, keep=2, also=[5])
    assert sorted(p.name for p in removed) == [ckpt.dir_name(10)]
    assert half.is_dir() and old.is_dir() and (tmp_path / ckpt.dir_name(15)).is_dir()
