"""Surviving failure, the parts that need no cluster: the progress reader across a
resume's rewrite of metrics.jsonl, checkpoint manifests and the fallback past a damaged
checkpoint, and what a rerun may change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conf.schema import ConfigError, FinetuneConfig
from jobs import checkpoint as ckpt
from jobs import config as config_lib
from jobs import resume as resume_lib
from jobs import runlog
from jobs.config import compose
from jobs.progress import Tail


def _lines(path: Path, steps: range) -> None:
    with path.open("a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n")


def test_progress_tail_follows_a_resume_that_rewrites_the_log_shorter(tmp_path: Path) -> None:
    log = runlog.RunLog(tmp_path, enabled=True)
    path = tmp_path / runlog.METRICS
    _lines(path, range(1, 9))
    tail = Tail(path)
    assert [r["step"] for r in tail.read()] == list(range(1, 9))
    with path.open("a") as f:
        f.write('{"step": 9, "lo')  # a line still being written: waits
    assert tail.read() == []
    with path.open("a") as f:
        f.write('ss": 0.1}\n')
    assert [r["step"] for r in tail.read()] == [9]
    # the resume: back to step 4's checkpoint, the file rewritten shorter, then appended
    log.truncate_after(4)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    _lines(path, range(5, 6))
    assert [r["step"] for r in tail.read()] == [1, 2, 3, 4, 5]
    _lines(path, range(6, 8))
    assert [r["step"] for r in tail.read()] == [6, 7]
    log.close()


def test_progress_tail_skips_a_damaged_line_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / runlog.METRICS
    tail = Tail(path)
    assert tail.read() == []
    path.write_text('{"step": 1}\n{"step": 2}{"step": 3}\n\xff\n{"step": 4}\n')
    assert [r["step"] for r in tail.read()] == [1, 4]


# --------------------------------------------------------------------------- manifests
def _write(
    parent: Path, step: int, *, world: int = 2, files: dict[str, bytes] | None = None
) -> Path:
    """A checkpoint as ckpt.save leaves it: data files, meta, manifests, then markers."""
    d = parent / ckpt.dir_name(step)
    (d / ckpt.TAG).mkdir(parents=True)
    for name, data in (
        files or {"ds/model.pt": b"m" * 300, "ds/optim.rank0.pt": b"o" * 500}
    ).items():
        (d / name).write_bytes(data)
    (d / ckpt.META).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": 2}))
    for r in range(world):
        ckpt.write_manifest(d, rank=r, world_size=world)
    for r in range(world):
        (d / f"COMMITTED.rank{r}").touch()
    return d


def test_every_file_of_a_checkpoint_is_in_one_rank_manifest(tmp_path: Path) -> None:
    d = _write(tmp_path, 4, world=3, files={f"ds/f{i}": bytes([i]) * i for i in range(1, 6)})
    entries = ckpt.manifest(d)
    assert entries is not None
    assert sorted(entries) == sorted([f"ds/f{i}" for i in range(1, 6)] + [ckpt.META])
    assert entries["ds/f3"]["size"] == 3
    assert ckpt.problems(d, full=True) == []
    # the ranks' shares of the verification cover every file once
    shares = [ckpt.problems(d, full=True, share=(r, 3)) for r in range(3)]
    assert shares == [[], [], []]


def test_a_truncated_or_corrupt_file_skips_to_the_previous_checkpoint(tmp_path: Path) -> None:
    older, newer = _write(tmp_path, 4), _write(tmp_path, 8)
    shard = newer / "ds/optim.rank0.pt"
    shard.write_bytes(shard.read_bytes()[:250])  # truncated half-way
    said: list[str] = []
    assert ckpt.latest_usable(tmp_path, warn=said.append) == older
    assert "optim.rank0.pt" in said[0] and "250 bytes" in said[0] and "500" in said[0]
    # the same size, other bytes: only the checksum sees it
    shard.write_bytes(b"x" * 500)
    assert ckpt.latest_usable(tmp_path, warn=said.append) == newer  # the sizes are right
    assert ckpt.problems(newer, full=False) == []
    assert ckpt.latest_usable(tmp_path, full=True, warn=said.append) == older
    assert "checksum" in said[-1]
    # a checkpoint moved away, or deleted: the listing is the whole index
    older.rename(tmp_path / "moved-away")
    with pytest.raises(ckpt.NoUsableCheckpoint, match="optim.rank0.pt") as raised:
        ckpt.latest_usable(tmp_path, full=True, warn=said.append)
    assert "not restarting from step 0" in str(raised.value)
    shutil.rmtree(newer)
    assert ckpt.latest_usable(tmp_path) is None  # nothing complete: a fresh start


def test_a_checkpoint_without_manifests_is_loaded_unverified(tmp_path: Path) -> None:
    d = _write(tmp_path, 4)
    for m in d.glob("MANIFEST.*"):
        m.unlink()
    assert ckpt.manifest(d) is None and ckpt.problems(d, full=True) == []
    assert ckpt.latest_usable(tmp_path, full=True) == d


# --------------------------------------------------------------------------- reruns
def _run_dir(tmp_path: Path, cfg: FinetuneConfig, *, step: int = 6) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / resume_lib.CONFIG).write_text(config_lib.to_yaml(cfg))
    _write(run_dir / "checkpoints", step, world=cfg.scaling.num_workers)
    return run_dir


def _cfg(*overrides: str) -> FinetuneConfig:
    return compose(
        [
            "model=tiny_llama",
            "data.task=instruction",
            "scaling.num_workers=2",
            "train.max_steps=12",
            *overrides,
        ]
    )


def test_a_fresh_run_dir_is_not_a_rerun(tmp_path: Path) -> None:
    assert resume_lib.check_rerun(_cfg(), tmp_path / "none") is None
    (tmp_path / "half" / "checkpoints" / ckpt.dir_name(3)).mkdir(parents=True)
    assert resume_lib.check_rerun(_cfg(), tmp_path / "half") is None


@pytest.mark.parametrize(
    "change",
    [
        "run.export=false",
        "train.eval_every=3",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.keep_checkpoints=5",
        "cluster.num_cpus=4",
        "eval.max_new_tokens=8",
        "scaling.cpus_per_worker=2",
    ],
)
def test_a_rerun_may_change_what_does_not_change_training(tmp_path: Path, change: str) -> None:
    run_dir = _run_dir(tmp_path, _cfg())
    rerun = resume_lib.check_rerun(_cfg(change), run_dir)
    assert rerun is not None and rerun.step == 6 and rerun.world_size == 2


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ("train.lr=0.5", "train.lr", "0.5"),
        ("strategy=lora", "strategy.name", "'lora'"),
        ("train.seed=3", "train.seed", "-> 3"),
        ("deepspeed=zero3", "deepspeed.stage", "-> 3"),
        # the global batch is kept on a resume (8 x 1 x 2 workers = 16)
        ("train.micro_batch_size=3", "train.micro_batch_size", "3 x 1 x 2 = 6"),
        ("eval.source_path=/tmp/x.txt", "eval.source_path", "/tmp/x.txt"),
        # a linear decay is laid out over max_steps: it would jump mid-run
        ("train.max_steps=20", "train.max_steps", "train.schedule=linear decays the lr"),
        # no micro batch x accumulation makes 4 on 3 workers
        ("scaling.num_workers=3", "scaling.num_workers", "allowed scaling.num_workers: 1, 2, 4, 8"),
        ("scaling.num_workers=1 train.grad_accum_steps=3", "scaling.num_workers", "keep it with"),
    ],
)
def test_a_rerun_that_cannot_continue_the_checkpoints_is_refused(
    tmp_path: Path, change: str, key: str, says: str
) -> None:
    run_dir = _run_dir(tmp_path, _cfg())
    before = (run_dir / resume_lib.CONFIG).read_text()
    with pytest.raises(ConfigError) as raised:
        resume_lib.check_rerun(_cfg(*change.split()), run_dir)
    assert raised.value.key == key and says in str(raised.value)
    assert (run_dir / resume_lib.CONFIG).read_text() == before  # nothing rewritten


@pytest.mark.parametrize(
    ("change", "micro", "accum"),
    [
        (["scaling.num_workers=1"], 2, 2),  # the accumulation doubles
        (["scaling.num_workers=4", "train.micro_batch_size=1"], 1, 1),
        (["train.micro_batch_size=1", "train.grad_accum_steps=2"], 1, 2),  # same world, by hand
    ],
)
def test_a_rerun_on_another_world_size_keeps_the_global_batch(
    tmp_path: Path, change: list[str], micro: int, accum: int
) -> None:
    run_dir = _run_dir(tmp_path, _cfg("train.micro_batch_size=2"))
    rerun = resume_lib.check_rerun(_cfg("train.micro_batch_size=2", *change), run_dir)
    assert rerun is not None and rerun.world_size == 2
    train = rerun.cfg.train
    assert (train.micro_batch_size, train.grad_accum_steps) == (micro, accum)
    assert micro * accum * rerun.cfg.scaling.num_workers == 4


def test_max_steps_may_change_with_a_constant_schedule(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, _cfg("train.schedule=constant", "train.warmup_steps=0"))
    assert resume_lib.check_rerun(
        _cfg("train.schedule=constant", "train.warmup_steps=0", "train.max_steps=30"), run_dir
    )
    with pytest.raises(ConfigError, match="before the run's checkpoint at step 6"):
        resume_lib.check_rerun(
            _cfg("train.schedule=constant", "train.max_steps=4", "train.warmup_steps=0"), run_dir
        )


def test_several_refused_keys_are_named_together(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, _cfg())
    with pytest.raises(ConfigError) as raised:
        resume_lib.check_rerun(_cfg("train.lr=0.5", "train.seed=9"), run_dir)
    assert "train.lr" in str(raised.value) and "train.seed" in str(raised.value)


# --------------------------------------------------------------------------- two drivers
def _collide(path: Path, write: Any, seconds: float) -> list[str]:
    """Two "drivers" finishing together: each writes the summary and reads it back (as
    its report does) in a loop; the read errors they hit."""
    import threading
    import time

    summary = json.dumps({"trials": [{"n": i, "value": i / 7} for i in range(40000)]})
    errors: list[str] = []
    stop = time.time() + seconds

    def driver() -> None:
        while time.time() < stop and not errors:
            write(path, summary)
            try:
                json.loads(path.read_text())
            except ValueError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=driver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_two_drivers_finishing_together_never_read_half_a_summary(tmp_path: Path) -> None:
    """The cause of test_two_drivers_share_a_postgresql_study's failure: both drivers
    wrote summary.json (and the report's files) with write_text, which truncates first,
    while the other's report read it: "Expecting value" for one of them, exit 1. Here
    the collision is made on purpose: plain writes show it, the atomic writes do not."""
    plain = _collide(tmp_path / "plain.json", lambda p, t: p.write_text(t), seconds=20)
    assert plain, "the plain writes did not collide in 20 s (the provocation failed)"
    atomic = _collide(tmp_path / "summary.json", runlog.write_atomic, seconds=3)
    assert atomic == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "summary.json"]


# --------------------------------------------------------------------------- data order
@pytest.mark.parametrize(("was", "now"), [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 1), (1, 2))])
@pytest.mark.parametrize("stop", [0, 3, 5, 11])
def test_the_data_order_continues_on_another_world_size(
    was: tuple[int, int], now: tuple[int, int], stop: int
) -> None:
    """The examples a gang saw before its checkpoint plus those the new gang sees after
    it are the uninterrupted gang's, epoch by epoch: none twice, none skipped."""
    from jobs import data as data_lib

    n = 23

    def seen(world: int, micro: int, start: int, steps: int) -> list[tuple[int, int]]:
        """(epoch, example) for every example the gang's ranks take in ``steps`` micro steps."""
        per = data_lib.micro_batches_per_epoch(n, world_size=world, micro_batch_size=micro)
        out = []
        for step in range(start, start + steps):
            epoch, index = divmod(step, per)
            for rank in range(world):
                shard = data_lib.train_shard(n, rank=rank, world_size=world, epoch=epoch, seed=3)
                out += [(epoch, j) for j in shard[index * micro : (index + 1) * micro]]
        return out

    before = seen(*was, 0, stop)  # (a global micro step: world x micro examples)
    start = data_lib.continue_order(stop, num_examples=n, was=was, now=now)
    per_now = data_lib.micro_batches_per_epoch(n, world_size=now[0], micro_batch_size=now[1])
    epoch_end = (start // per_now + 1) * per_now
    after = seen(*now, start, epoch_end - start)  # the rest of the resumed epoch
    epoch = start // per_now
    this_epoch = [j for e, j in before + after if e == epoch]
    assert len(this_epoch) == len(set(this_epoch))  # none twice
    # none skipped: the epoch's order, up to the end the new gang runs to
    order = [j for _, j in seen(1, 1, epoch * n, n)]
    assert sorted(this_epoch) == sorted(order[: len(this_epoch)])
    assert len(this_epoch) >= n - now[0] * now[1]  # (only the new gang's remainder dropped)
