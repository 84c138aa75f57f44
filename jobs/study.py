"""The Optuna study behind a sweep: storage, heartbeats, budget, and what a rerun reclaims.

    python -c "from jobs.study import open_storage; print(open_storage('sqlite:///runs/x.db'))"

The study is the sweep's source of truth, so any number of drivers (a rerun after a
crash, a second machine on the same PostgreSQL study) see the same trials:
- every running trial gets a heartbeat from its driver; a trial whose heartbeat stops
  is failed and re-queued (Optuna's RetryHeartbeatStaleTrialCallback), keeping its
  params and intermediate values; the retry trains in the original trial's run
  directory, so it resumes from that trial's last complete checkpoint;
- a rerun on the same machine does not wait for the heartbeat to go stale: trials of a
  driver whose process is gone (``<sweep>/drivers/<id>.json``) are re-queued at once;
- the budget (``sweep.num_trials``) counts every trial except the failed ones that
  were re-queued, so neither a rerun nor a second driver exceeds it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conf.schema import ConfigError, SweepConfig

HEARTBEAT_S = 5
GRACE_S = 20
DRIVERS = "drivers"


def storage_url(sweep: SweepConfig, sweep_dir: Path) -> str:
    return sweep.storage or f"sqlite:///{sweep_dir / 'study.db'}"


def open_storage(url: str) -> Any:
    """An RDBStorage with heartbeats; ConfigError (naming sweep.storage) if it cannot be
    opened, before any cluster resource is taken."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "sweep.storage",
            f"{url!r} is not a database URL; e.g. sqlite:///path/study.db or postgresql://user@host/db",
        ) from None
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        # SQLAlchemy 2.1 picks psycopg (3) for postgresql://; graft ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
        url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        parent = Path(parsed.database).expanduser().parent
        if not parent.is_dir():
            raise ConfigError("sweep.storage", f"{url!r}: directory {parent} does not exist")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        with _schema_lock(url):
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True}
                if parsed.get_backend_name() != "sqlite"
                else {},
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    inherit_intermediate_values=True
                ),
            )
    except Exception as e:  # sqlalchemy/driver errors: missing driver, refused, auth
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("sweep.storage", f"cannot open {redact(url)}: {reason}") from None


# Any fixed 64-bit key: the PostgreSQL advisory lock graft drivers take around schema setup.
SCHEMA_LOCK_KEY = 0x67726166745F7363  # "graft_sc"


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Held while RDBStorage creates (or checks) Optuna's tables: drivers that start
    together on a new database would otherwise both run CREATE TABLE, and PostgreSQL
    fails the loser on its catalog's unique index (pg_type_typname_nsp_index). A
    PostgreSQL advisory lock (on its own connection), or a lock file beside a SQLite
    database; other backends as they are."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
        finally:
            engine.dispose()
    elif backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        import fcntl

        with open(Path(parsed.database).expanduser().with_suffix(".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def make_sampler(sweep: SweepConfig, *, offset: int) -> Any:
    """``offset`` (trials already in the study) moves the seed, so a rerun or a second
    driver does not propose the same first points again."""
    import optuna

    seed = sweep.seed + offset
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=sweep.n_startup_trials,
        multivariate=True,
        group=True,  # conditional space: model each strategy's parameters together
        constant_liar=True,  # concurrent trials: do not propose the same point twice
    )


def open_study(sweep: SweepConfig, storage: Any, name: str) -> Any:
    import optuna

    directions: list[Any] = [
        "maximize" if o.mode == "max" else "minimize" for o in sweep.objectives
    ]
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name in existing:
        found = [d.name.lower() for d in existing[name].directions]
        if found != directions:
            raise ConfigError(
                "sweep.objectives",
                f"study {name!r} exists with directions {found}, this sweep has {directions}; "
                "use another sweep.study",
            )
    offset = existing[name].n_trials if name in existing else 0
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=directions,
        load_if_exists=True,
        sampler=make_sampler(sweep, offset=offset),
    )
    study.set_metric_names([o.metric for o in sweep.objectives])
    return study


def budget_used(study: Any, *, before: int | None = None) -> int:
    """Trials that used up the budget (sweep.num_trials): all but the queued ones
    (WAITING: they are the budget's own retries and enqueued points), the failed ones
    that were re-queued, and over-budget slips. ``before``: only trials numbered lower."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return sum(
        1
        for t in trials
        if (before is None or t.number < before)
        and t.state != TrialState.WAITING
        and not (
            t.state == TrialState.FAIL and (t.number in retried or t.user_attrs.get("over_budget"))
        )
    )


def queued(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def origin(trial: Any) -> int:
    """The number of the trial whose run directory this one uses (itself, or the
    original of a retried trial)."""
    history = trial.system_attrs.get("retry_history") or []
    return int(history[0]) if history else int(trial.number)


def finished_curves(study: Any) -> list[tuple[str, dict[str, Any], list[tuple[int, float]]]]:
    """(key, params, [(evals, value), ...]) of every trial that has ended (complete,
    pruned or failed) and is not being retried: what an earlier driver's scheduler saw,
    for a new driver's to start from. One entry per run directory (a retried trial's
    newest attempt); its intermediate values where Optuna kept them (one objective),
    else the learning curve graft records."""
    from optuna.trial import TrialState

    newest: dict[int, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        key = origin(trial)
        if key not in newest or trial.number > newest[key].number:
            newest[key] = trial
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    out = []
    for key, trial in sorted(newest.items()):
        if trial.state not in ended:
            continue  # waiting or running: it will report again
        points = sorted(trial.intermediate_values.items()) or [
            (int(e), float(v)) for e, v in trial.user_attrs.get("curve", [])
        ]
        if points:
            out.append(
                (f"study-{key}", dict(trial.params), [(int(e), float(v)) for e, v in points])
            )
    return out


# ----------------------------------------------------------------- drivers and heartbeats
def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class Driver:
    """This process as a sweep driver: registers itself under <sweep>/drivers/, beats the
    heart of its running trials, and unregisters on a clean exit."""

    def __init__(self, sweep_dir: Path, storage: Any) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.storage = storage
        self.path = sweep_dir / DRIVERS / f"{self.id}.json"
        self._trials: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="graft-heartbeat", daemon=True)

    def __enter__(self) -> Driver:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._me = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid()}
        self._me["started"] = _process_start(os.getpid())
        self._write()
        self._thread.start()
        return self

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._me))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def asking(self) -> Iterator[None]:
        """Around ask() and the writes that mark the new trial as this driver's: a driver
        that dies inside leaves ``asking`` in its file, so ``reclaim`` can tell its
        unmarked RUNNING trial from another live driver's."""
        self._me["asking"] = time.time()
        self._write()
        yield
        self._me.pop("asking")
        self._write()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S * 2)
        self.path.unlink(missing_ok=True)

    def track(self, trial_id: int) -> None:
        with self._lock:
            self._trials.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def untrack(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                ids = list(self._trials)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a finished trial, or a database hiccup: next beat retries
                    pass


def reclaim(study: Any, sweep_dir: Path) -> list[int]:
    """Re-queue the running trials of drivers on this host whose process is gone (a
    killed ``graft sweep``), without waiting for their heartbeats to go stale. Returns
    the numbers of the trials re-queued."""
    import copy

    from optuna.trial import TrialState

    dead: set[str] = set()
    asking: list[float] = []  # when dead drivers started an ask() they did not finish
    for path in sorted((sweep_dir / DRIVERS).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("host") != socket.gethostname():
            continue  # another machine's driver: its heartbeat decides
        started = _process_start(int(info["pid"]))
        if started is None or (info.get("started") and abs(started - info["started"]) > 1):
            dead.add(info["id"])
            if info.get("asking"):
                asking.append(float(info["asking"]))
            path.unlink(missing_ok=True)
    storage = study._storage
    callback = storage.get_heartbeat_stale_trial_callback()
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("driver")
        unmarked = owner is None and any(
            trial.datetime_start is not None and trial.datetime_start.timestamp() >= t - 1
            for t in asking
        )
        if owner in dead or unmarked:
            try:
                if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
                    requeued.append(trial.number)
            except Exception:  # another driver got there first
                continue
    return requeued
