"""run.loggers: MLflow (a real SQLite tracking store, and a real tracking server started
by a test, read back with the mlflow client),
W&B offline, TensorBoard; a resumed run continues its tracker run; a failing tracker
is reported and dropped, never fatal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conf.schema import ConfigError
from jobs import runlog, trackers
from jobs.config import compose
from tests.conftest import tiny_overrides

mlflow = pytest.importorskip("mlflow", reason="run.loggers=[mlflow] needs mlflow-skinny")


def _cfg(data_dir: Path, tmp_path: Path, loggers: str):  # type: ignore[no-untyped-def]
    return compose(
        tiny_overrides(data_dir)
        + [
            f"run.output_dir={tmp_path}",
            "run.name=tracked",
            f"run.loggers={loggers}",
            "run.project=graft-test",
        ]
    )


def test_mlflow_gets_params_metrics_per_step_and_the_export_and_a_resume_continues(
    data_dir: Path, tmp_path: Path
) -> None:
    cfg = _cfg(data_dir, tmp_path, "[tensorboard,mlflow]")
    run_dir = tmp_path / "tracked"
    run_dir.mkdir()
    log = runlog.RunLog(run_dir, enabled=True, cfg=cfg)
    log.log({"event": "start", "step": 0, "lr": {"head": 1e-3, "other": 5e-4}, "phase_name": "x"})
    for step, loss in ((1, 2.0), (2, 1.5)):
        log.log({"step": step, "loss": loss})
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    log.artifact(tmp_path / "export", "export")
    log.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default: beside the runs
    client = mlflow.MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "graft-test"]
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "tracked"
    assert json.loads(tracked.data.params["train.lr"]) == cfg.train.lr
    assert json.loads(tracked.data.params["strategy.name"]) == cfg.strategy.name
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert client.get_metric_history(tracked.info.run_id, "lr/head")[0].value == 1e-3
    (art,) = client.list_artifacts(tracked.info.run_id, "export")
    assert art.path == "export/config.json"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The gang restarts (a resume): the same MLflow run goes on.
    again = runlog.RunLog(run_dir, enabled=True, cfg=cfg)
    again.log({"step": 3, "loss": 1.25})
    again.close()
    assert len(client.search_runs([experiment.experiment_id])) == 1
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]


@pytest.fixture
def mlflow_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real MLflow tracking server on a free loopback port (SQLite behind it, artifacts
    served over HTTP), as a team runs one; stopped after the test."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from cluster.connect import free_port

    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{tmp_path / 'server.db'}",
            f"--artifacts-destination={tmp_path / 'server-artifacts'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, (
            "mlflow server did not come up: " + (tmp_path / "mlflow-server.log").read_text()[-2000:]
        )
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def test_mlflow_through_a_tracking_server_started_by_the_test(
    data_dir: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """run.mlflow_tracking_uri=http://...: params, metrics per step and the export as
    an artifact (uploaded through the server) read back with the mlflow client."""
    cfg = compose(
        tiny_overrides(data_dir)
        + [
            f"run.output_dir={tmp_path}",
            "run.name=served",
            "run.loggers=[mlflow]",
            "run.project=graft-served",
            f"run.mlflow_tracking_uri={mlflow_server}",
        ]
    )
    run_dir = tmp_path / "served"
    run_dir.mkdir()
    log = runlog.RunLog(run_dir, enabled=True, cfg=cfg)
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.25)):
        log.log({"step": step, "loss": loss})
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text('{"model_type": "llama"}')
    log.artifact(tmp_path / "export", "export")
    log.close()
    client = mlflow.MlflowClient(mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "graft-served"]
    (served,) = client.search_runs([experiment.experiment_id])
    assert served.info.run_name == "served"
    assert json.loads(served.data.params["train.max_steps"]) == cfg.train.max_steps
    history = client.get_metric_history(served.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    got = client.download_artifacts(served.info.run_id, "export/config.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == {"model_type": "llama"}
    # (uploaded to the server's own store, not written beside the run by the client)
    assert list((tmp_path / "server-artifacts").rglob("config.json"))


def test_wandb_writes_an_offline_run_that_a_resume_continues(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="run.loggers=[wandb] needs wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(data_dir, tmp_path, "[wandb]")
    run_dir = tmp_path / "tracked"
    run_dir.mkdir()
    log = runlog.RunLog(run_dir, enabled=True, cfg=cfg)
    log.log({"step": 1, "loss": 2.0})
    log.close()
    run_id = json.loads((run_dir / trackers.IDS).read_text())["wandb"]
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb")), "the offline run holds no history file"
    assert not (run_dir / "tensorboard").exists()  # only the loggers asked for


def test_a_failing_tracker_is_reported_and_dropped(data_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(data_dir, tmp_path, "[tensorboard]")
    run_dir = tmp_path / "tracked"
    run_dir.mkdir()
    log = runlog.RunLog(run_dir, enabled=True, cfg=cfg)

    class Down:
        name = "mlflow"

        def log(self, values: dict[str, float], step: int) -> None:
            raise ConnectionError("tracking server went away")

    log.trackers.active.append(Down())
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.0})
    log.close()
    records = runlog.read(run_dir)
    assert [r.get("loss") for r in records if "loss" in r] == [2.0, 1.0]
    (failed,) = [r for r in records if r.get("event") == "tracker_failed"]
    assert failed["tracker"] == "mlflow" and "went away" in failed["error"]


@pytest.mark.parametrize(
    ("loggers", "message"),
    [("[mlflow,mlflow]", "names a logger twice"), ("[neptune]", "'neptune' is not one of")],
)
def test_bad_loggers_are_refused(
    data_dir: Path, tmp_path: Path, loggers: str, message: str
) -> None:
    cfg = _cfg(data_dir, tmp_path, "[tensorboard]")
    bad = dataclasses.replace(
        cfg,
        run=dataclasses.replace(
            cfg.run,
            loggers=json.loads(loggers.replace("[", '["').replace("]", '"]').replace(",", '","')),
        ),
    )
    with pytest.raises(ConfigError, match=message) as e:
        bad.check()
    assert e.value.key == "run.loggers"
