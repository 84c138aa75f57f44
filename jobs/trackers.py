"""Experiment trackers a run's metrics go to, beside ``metrics.jsonl``: ``run.loggers``.

    graft finetune run.loggers=[tensorboard,mlflow]
    graft finetune run.loggers=[wandb] run.project=my-project    # offline by default

- ``tensorboard``: ``<run>/tensorboard`` (``graft dashboard RUN`` serves it).
- ``mlflow``: through Ray's ``setup_mlflow``; the tracking store is
  ``run.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
  ``<run.output_dir>/mlflow.db`` (artifacts in ``<run.output_dir>/mlflow-artifacts``). The config is the run's params, every record's
  numbers its metrics (per step), the export its artifact.
- ``wandb``: ``wandb.init``, offline unless ``$WANDB_MODE`` says
  otherwise (``wandb sync <run>/wandb/offline-run-*`` uploads it later).

A resumed run continues its own tracker run (the ids are kept in ``<run>/trackers.json``).
A tracker that fails while training is reported (stderr and a ``tracker_failed`` record)
and dropped; the training goes on, ``metrics.jsonl`` keeps everything.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IDS = "trackers.json"
# Packages each logger needs, and what to install.
PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """A record's numbers as (name, value): nested dicts as ``key/sub``; bookkeeping out."""
    for key, value in record.items():
        if key in ("step", "time", "session") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield key, float(value)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{key}/{sub}", float(v)


def mlflow_uri(run_cfg: Any) -> str:
    if run_cfg.mlflow_tracking_uri:
        return str(run_cfg.mlflow_tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_cfg.output_dir).expanduser().resolve() / 'mlflow.db'}"


def artifact_location(run_cfg: Any, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: for a local store (SQLite, files) beside
    the runs, not MLflow's default ./mlruns under whatever directory the worker runs in;
    a tracking server decides for itself."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (Path(run_cfg.output_dir).expanduser().resolve() / "mlflow-artifacts").as_uri()
    return None


def missing_packages(loggers: list[str]) -> list[str]:
    """The pip packages ``run.loggers`` needs that are not installed (preflight)."""
    import importlib.util

    return [
        PACKAGES[name][1]
        for name in loggers
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None
    ]


def flat_params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value, default=str)[:500]
    return out


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def artifact(self, path: Path, name: str) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, cfg: Any, params: dict[str, Any], ids: dict[str, str]):
        from ray.air.integrations.mlflow import setup_mlflow

        uri = mlflow_uri(cfg.run)
        resumed = ids.get("mlflow")
        if resumed:  # mlflow.start_run continues the run MLFLOW_RUN_ID names
            os.environ["MLFLOW_RUN_ID"] = resumed
        try:
            self.mlflow = setup_mlflow(
                # params are set once: a resumed run keeps the first start's
                {} if resumed else flat_params(params),
                tracking_uri=uri,
                artifact_location=artifact_location(cfg.run, uri),
                experiment_name=cfg.run.project,
                run_name=run_dir.name,
                create_experiment_if_not_exists=True,
                tags={"graft.run_dir": str(run_dir)},
            )
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
        self.run_id = self.mlflow.active_run().info.run_id
        ids["mlflow"] = self.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        # MLflow allows letters, digits and _-./ in names: the rest become _
        clean = {
            "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v
            for k, v in values.items()
        }
        self.mlflow.log_metrics(clean, step=step)

    def artifact(self, path: Path, name: str) -> None:
        self.mlflow.log_artifacts(str(path), artifact_path=name)

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, *, cfg: Any, params: dict[str, Any], ids: dict[str, str]):
        # wandb.init itself: Ray's setup_wandb demands an API key even for offline runs
        import wandb

        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]
        self.run = wandb.init(
            project=cfg.run.project,
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            dir=str(run_dir),
            id=run_id,
            name=run_dir.name,
            resume="allow",
            config=params,
        )
        ids["wandb"] = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path, name: str) -> None:
        self.run.log_artifact(str(path), name=f"{self.run.name}-{name}", type="model")

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The run's trackers (rank 0). Failures after the start are reported, not raised."""

    def __init__(self, run_dir: Path, cfg: Any, on_failure: Any = None) -> None:
        from dataclasses import asdict

        self.run_dir = Path(run_dir)
        self.on_failure = on_failure
        ids_path = self.run_dir / IDS
        ids: dict[str, str] = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        params = asdict(cfg)
        self.active: list[Any] = []
        for name in cfg.run.loggers:
            kind = KINDS[name]
            self.active.append(
                kind(self.run_dir)
                if kind is TensorBoard
                else kind(self.run_dir, cfg=cfg, params=params, ids=ids)
            )
        if ids:
            ids_path.write_text(json.dumps(ids, indent=1))

    @classmethod
    def tensorboard_only(cls, run_dir: Path) -> Trackers:
        trackers = cls.__new__(cls)
        trackers.run_dir, trackers.on_failure = Path(run_dir), None
        trackers.active = [TensorBoard(Path(run_dir))]
        return trackers

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, call)(*args)
            except Exception as e:  # a tracker's outage must not end the training
                self.active.remove(tracker)
                message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(
                    f"graft: the {tracker.name} logger failed ({message}); it is off for the "
                    "rest of this run, metrics.jsonl has everything",
                    file=sys.stderr,
                )
                if self.on_failure is not None:
                    self.on_failure(tracker.name, message)

    def log(self, record: dict[str, Any]) -> None:
        values = dict(scalars(record))
        if values:
            self._each("log", values, int(record.get("step", 0)))

    def artifact(self, path: Path, name: str) -> None:
        self._each("artifact", Path(path), name)

    def close(self) -> None:
        self._each("close")
        self.active = []
