"""jobs.pool on a real local Ray: one long-lived gang of 2 DeepSpeed workers (gloo)
trains run after run; a cancelled run stops at a report and frees the gang; a run
that raises kills its gang's fit, its reader gets the workers' error and the slot
starts a fresh gang for the next run.

    pytest tests/integration/test_pool.py
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from jobs import config as config_lib
from jobs import runlog
from jobs.config import compose
from jobs.finetune import FAIL_AT_STEP_ENV, STEP_SLEEP_ENV
from jobs.pool import Pool
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_2cpus")]


def _cfg(data_dir: Path, tmp_path: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    cfg = compose(
        tiny_overrides(data_dir)
        + [
            "scaling.num_workers=2",
            "deepspeed=zero3",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            *extra,
        ]
    )
    return config_lib.with_run_name(cfg)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in runlog.read(run_dir) if "loss" in r]


def test_one_gang_trains_runs_in_turn_cancels_and_survives_a_failure(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _cfg(data_dir, tmp_path, "a")
    other = _cfg(data_dir, tmp_path, "other", "strategy=lora", "train.lr=3e-3")
    long = _cfg(data_dir, tmp_path, "long", "train.max_steps=400", "train.eval_every=2")
    pool = Pool.start(a, slots=1, root=tmp_path / "pool")
    try:
        # Three runs in turn on one gang: a, a different one, a again in a fresh
        # directory. The repeat trains exactly as the first did: nothing leaks between runs.
        a_again = dataclasses.replace(a, run=dataclasses.replace(a.run, name="a_again"))
        finals = pool.run_all(
            [
                ("a", a, tmp_path / "a"),
                ("other", other, tmp_path / "other"),
                ("a_again", a_again, tmp_path / "a_again"),
            ]
        )
        assert [f["final"] for f in finals] == [1, 1, 1]
        first = _losses(tmp_path / "a")
        assert len(first) == 12 and first[-1] < first[0]
        assert _losses(tmp_path / "a_again") == pytest.approx(first, rel=1e-6)
        assert finals[1]["trainable_params"] < finals[0]["trainable_params"]  # LoRA's
        start = next(r for r in runlog.read(tmp_path / "other") if r.get("event") == "start")
        assert start["world_size"] == 2

        # Cancelled after its first report: it stops at a later report, well before its
        # 400 steps, and the same gang trains the next run.
        pool.submit("long", long, tmp_path / "long")
        reports = pool.results("long")
        first_report = next(reports)
        assert first_report["evals"] == 1
        pool.cancel("long")
        assert [r for r in reports if r.get("final")] == []
        records = runlog.read(tmp_path / "long")
        cancelled = [r for r in records if r.get("event") == "cancelled"]
        assert len(cancelled) == 1 and cancelled[0]["step"] < 400
        assert not [r for r in records if r.get("event") == "end"]
        b = _cfg(data_dir, tmp_path, "b")
        assert pool.run_all([("b", b, tmp_path / "b")])[0]["final"] == 1

        # A run that raises on its workers: its reader gets the error, the slot starts a
        # fresh gang, and that gang trains the next run.
        monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")
        pool.submit("crash", a, tmp_path / "crash")
        with pytest.raises(RuntimeError, match="GRAFT_FAIL_AT_STEP=3"):
            list(pool.results("crash"))
        monkeypatch.delenv(FAIL_AT_STEP_ENV)

        # A trial's worker SIGKILLed (train.max_failures=1): the slot starts a fresh gang
        # and the run is queued again; it resumes from its checkpoint at step 4 and ends
        # as the uninterrupted run did.
        killed = _cfg(data_dir, tmp_path, "killed", "train.max_failures=1")
        monkeypatch.setenv(STEP_SLEEP_ENV, "0.3")  # (read at submission)
        pool.submit("killed", killed, tmp_path / "killed")
        monkeypatch.delenv(STEP_SLEEP_ENV)
        log = tmp_path / "killed"
        deadline = time.time() + 300
        while max((r["step"] for r in runlog.read(log) if "loss" in r), default=0) < 5:
            assert time.time() < deadline, "the run did not reach step 5"
            time.sleep(0.05)
        start = next(r for r in runlog.read(log) if r.get("event") == "start")
        os.kill(start["pids"][1], signal.SIGKILL)
        assert [r for r in pool.results("killed") if r.get("final")]
        records = runlog.read(log)
        assert [r["attempt"] for r in records if r.get("event") == "failure"] == [1]
        assert [r["step"] for r in records if r.get("event") == "resume"] == [4]
        assert _losses(log) == pytest.approx(first, rel=1e-6)

        c = _cfg(data_dir, tmp_path, "c")
        assert pool.run_all([("c", c, tmp_path / "c")])[0]["final"] == 1
        assert _losses(tmp_path / "c") == pytest.approx(first, rel=1e-6)
    finally:
        fits = pool.close()
    assert fits == [3]  # one gang for six runs, one more after the crash, one after the kill
