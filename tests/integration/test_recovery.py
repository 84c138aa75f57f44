"""Recovery with real signals and real file damage, on a real local Ray with real
DeepSpeed over gloo, 2 workers: a SIGTERMed worker checkpoints at the next step and the
gang goes on; a SIGKILLed worker makes the gang restart from the newest checkpoint
(train.max_failures); a truncated shard is skipped for the checkpoint before it; a
SIGTERMed driver exits 143 after a checkpoint; a SIGKILLed driver's leftover Ray
processes are stopped by the next run, which resumes. Every run ends with the losses
and final eval loss of a run that was never interrupted.

    pytest tests/integration/test_recovery.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.connect import session_processes
from jobs import checkpoint as ckpt
from jobs import finetune, runlog
from jobs.config import compose
from jobs.preempt import EXIT_CODE
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
# The interrupted runs' steps take this long (a tiny model's take ~0.1 s): a signal
# sent after step k reaches the workers during step k + 1.
STEP_S = 0.4

# 16 steps, a checkpoint every 4: a kill after step 9 goes back to step 8.
RECOVERY = [
    "deepspeed=zero2",
    "train.max_steps=16",
    "train.checkpoint_every=4",
    "train.eval_every=8",
    "train.keep_checkpoints=3",
]


def _overrides(data_dir: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        *tiny_overrides(data_dir),
        *RECOVERY,
        "scaling.num_workers=2",
        f"run.output_dir={out}",
        f"run.name={name}",
        *extra,
    ]


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == name]


def _wait_for(what: Callable[[], Any], timeout_s: float = 300, why: str = "") -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if found := what():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {why or what}")


def _logged_step(run_dir: Path, after: int = 0) -> int:
    """The newest step in the log with a loss, from the ``after``-th record on."""
    records = runlog.read(run_dir)[after:]
    return max((r["step"] for r in records if "loss" in r), default=0)


def _resumed_at(run_dir: Path) -> int:
    """Where the log's first resume record is (past the end while there is none)."""
    records = runlog.read(run_dir)
    return next((i for i, r in enumerate(records) if r.get("event") == "resume"), len(records))


def _described(procs: list[Any]) -> str:
    """What a failed no-leftovers check shows: each process, its parent and its state."""
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {proc.name()} ppid={proc.ppid()} {proc.status()}")
        except Exception as e:  # (it may have gone since)
            lines.append(f"{proc.pid}: {e}")
    return "\n".join(lines) + "\n"


def _pids(run_dir: Path) -> list[int]:
    """The worker pids of the newest start or resume of the run."""
    starts = [r for r in runlog.read(run_dir) if r.get("event") in ("start", "resume")]
    return list(starts[-1]["pids"]) if starts else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_2cpus: None) -> Any:
    """The same config, never interrupted: what every recovered run must equal."""
    out = tmp_path_factory.mktemp("straight")
    finetune.run(compose(_overrides(data_dir, out, "straight")), show_progress=False)
    return runlog.read(out / "straight")


def _same_run(records: list[dict[str, Any]], straight: list[dict[str, Any]]) -> None:
    a, b = _losses(straight), _losses(records)
    assert sorted(b) == sorted(a) == list(range(1, 17))  # one run: no step twice, none missing
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), f"step {step}"
    end, want = _events(records, "end")[-1], _events(straight, "end")[-1]
    assert end["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)


def test_a_preempted_and_a_killed_worker_recover_without_a_person(
    tmp_path: Path,
    data_dir: Path,
    ray_2cpus: None,
    straight: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM to a worker after step 2: a checkpoint at the next step boundary, a fresh
    gang resumes there. SIGKILL to a worker after step 9: the gang fails, Ray Train
    restarts it (train.max_failures=1) from step 8."""
    run_dir = tmp_path / "recover"
    cfg = compose(_overrides(data_dir, tmp_path, "recover", "train.max_failures=1"))
    signals: dict[str, Any] = {}

    def interrupt() -> None:
        _wait_for(lambda: _logged_step(run_dir) >= 2, why="step 2")
        signals["term_after"] = _logged_step(run_dir)
        os.kill(_pids(run_dir)[1], signal.SIGTERM)
        _wait_for(lambda: _events(runlog.read(run_dir), "preempted"), why="the preemption")
        signals["last_before_resume"] = _logged_step(run_dir)
        _wait_for(lambda: _events(runlog.read(run_dir), "resume"), why="the resume")
        count = len(runlog.read(run_dir))
        _wait_for(lambda: _logged_step(run_dir, after=count) >= 9, why="step 9")
        signals["kill_after"] = _logged_step(run_dir)
        signals["killed"] = _pids(run_dir)[0]
        os.kill(signals["killed"], signal.SIGKILL)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    monkeypatch.setenv(finetune.STEP_SLEEP_ENV, str(STEP_S))
    summary = finetune.run(cfg, show_progress=False)
    monkeypatch.delenv(finetune.STEP_SLEEP_ENV)
    thread.join(timeout=5)
    records = runlog.read(run_dir)
    preempted = _events(records, "preempted")
    failures = _events(records, "failure")
    resumes = _events(records, "resume")
    # the SIGTERM: a checkpoint at the next step boundary, nothing trained after it: at
    # most the step in flight was lost
    assert len(preempted) == 1 and "SIGTERM" in preempted[0]["by"]
    assert signals["term_after"] <= preempted[0]["step"] <= signals["term_after"] + 1
    assert resumes[0]["step"] == preempted[0]["step"] == signals["last_before_resume"]
    # the SIGKILL: one failure, the gang restarted from the newest checkpoint before it
    assert len(failures) == 1 and failures[0]["attempt"] >= 1
    assert resumes[1]["step"] == 4 * (signals["kill_after"] // 4) == 8
    assert signals["killed"] not in resumes[1]["pids"]  # a new process took rank 0
    _same_run(records, straight)
    assert summary.metrics["eval_loss"] == pytest.approx(_events(straight, "end")[-1]["eval_loss"])
    # (a truncated shard: test_a_killed_and_a_preempted_driver's last rerun)


def _driver(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "finetune", "-q", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def test_a_killed_and_a_preempted_driver(
    tmp_path: Path, data_dir: Path, ray_2cpus: None, straight: list[dict[str, Any]]
) -> None:
    """`graft finetune` as its own process. SIGKILL after step 5 leaves some of its
    embedded Ray's processes running; the rerun stops them, resumes from step 4, and
    gets SIGTERM (a pod's eviction) after step 6: it checkpoints and exits 143. With an
    optimizer shard of that checkpoint truncated, the run is finished here (in this
    process's Ray) from the one before, with the uninterrupted run's results."""
    run_dir = tmp_path / "driven"
    args = _overrides(data_dir, tmp_path, "driven", "cluster.dashboard=false")
    env = dict(
        os.environ,
        GRAFT_HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
        **{finetune.STEP_SLEEP_ENV: str(STEP_S)},
    )
    log = tmp_path / "driver.log"

    first = _driver(args, env, log)
    _wait_for(lambda: _logged_step(run_dir) >= 5, why="step 5")
    (record,) = (tmp_path / "home" / "embedded").glob("*.json")
    session_dir = json.loads(record.read_text())["session_dir"]
    first.kill()
    logged_at_kill = _logged_step(run_dir)
    first.wait(timeout=30)
    at_kill = ckpt.latest_complete(run_dir / "checkpoints")
    assert at_kill is not None
    kill_step = ckpt.read_meta(at_kill)["step"]
    time.sleep(2)  # (what dies with the driver has died)
    assert session_processes(session_dir), "Ray's agents outlive a SIGKILLed driver"
    # Its workers can outlive it too (for a minute, until their GCS client gives up:
    # seen in CI), but they stop at the next step boundary, writing nothing more.
    assert _logged_step(run_dir) <= logged_at_kill + 1, runlog.read(run_dir)[-3:]

    second = _driver(args, env, log)
    # step 6 of the rerun itself: the first resume's gang logged it
    _wait_for(lambda: _logged_step(run_dir, after=_resumed_at(run_dir)) >= 6, why="step 6")
    # the rerun stopped them as it started (they may also have died on their own by
    # then: tests/unit/test_local_cluster.py provokes the reaping itself)
    left = session_processes(session_dir)
    assert left == [], _described(left) + log.read_text()[-3000:]
    term_after = _logged_step(run_dir)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == EXIT_CODE, log.read_text()[-3000:]
    said = log.read_text()
    assert "rerun the same command to resume" in said and "Traceback" not in said
    preempted = _events(runlog.read(run_dir), "preempted")
    assert len(preempted) == 1 and preempted[0]["by"] == "SIGTERM to the driver"
    # a checkpoint at the next step boundary, nothing trained after it
    assert term_after <= preempted[0]["step"] <= term_after + 1
    assert preempted[0]["step"] == _logged_step(run_dir)
    assert ckpt.latest_complete(run_dir / "checkpoints") == (
        run_dir / "checkpoints" / ckpt.dir_name(preempted[0]["step"])
    )

    # A truncated optimizer shard in that newest checkpoint: the last rerun (in this
    # process's Ray) skips it, naming the file, resumes from the one before and ends
    # with the uninterrupted run's results.
    newest = ckpt.latest_complete(run_dir / "checkpoints")
    assert newest is not None
    before = [c for c in ckpt.complete(run_dir / "checkpoints") if c != newest][0]
    before_step = ckpt.read_meta(before)["step"]  # (the finished run prunes it)
    shard = next((newest / ckpt.TAG).glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    finetune.run(compose(args), show_progress=False)
    records = runlog.read(run_dir)
    skipped = _events(records, "checkpoint_skipped")
    assert skipped and shard.name in " ".join(skipped[-1]["problems"])
    steps = [r["step"] for r in _events(records, "resume")]
    # (the orphaned workers may have checkpointed the step in flight as their driver
    # died: the rerun takes the newest complete checkpoint)
    assert steps[0] >= kill_step and steps[0] % 4 == 0
    assert steps[1:] == [before_step]
    _same_run(records, straight)
