"""``graft dashboard``: a browser view of a sweep (optuna-dashboard on its study) or of
runs (TensorBoard on their ``tensorboard/`` folders).

    graft dashboard runs/<sweep-name>        # optuna-dashboard, the study in sweep.json
    graft dashboard runs/<run-name>          # TensorBoard on one run
    graft dashboard runs                     # TensorBoard over every run below, side by side

Both serve until Ctrl-C; the URL is printed first. ``--port 0`` takes a free port.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from conf.schema import ConfigError

KINDS = ("auto", "optuna", "tensorboard")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def what(target: Path, kind: str = "auto") -> str:
    """Which dashboard ``target`` gets: optuna (a sweep directory) or tensorboard (a run,
    or a folder of runs, with TensorBoard event files)."""
    if kind not in KINDS:
        raise ConfigError("--kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    if not target.is_dir():
        raise ConfigError("RUN_OR_SWEEP", f"{target} is not a directory")
    # a run's own logs, or those of the runs (and sweep trials) one or two levels below
    has_events = any(
        next(target.glob(f"{depth}tensorboard/events.out.tfevents.*"), None)
        for depth in ("", "*/", "*/*/")
    )
    if kind == "optuna" or (kind == "auto" and (target / "sweep.json").is_file()):
        if not (target / "sweep.json").is_file():
            raise ConfigError("RUN_OR_SWEEP", f"{target}: not a sweep directory (no sweep.json)")
        return "optuna"
    if has_events:
        return "tensorboard"
    raise ConfigError(
        "RUN_OR_SWEEP",
        f"{target} holds neither a sweep (sweep.json) nor TensorBoard logs "
        "(<run>/tensorboard, written with run.loggers=[tensorboard], the default)",
    )


def serve(
    target: Path,
    *,
    kind: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    storage: str | None = None,
    announce: Any = print,
) -> None:
    target = Path(target).expanduser().resolve()
    chosen = what(target, kind)
    if chosen == "optuna":
        _optuna(target, host, free_port(host) if not port else port, storage, announce)
    else:
        _tensorboard(target, host, free_port(host) if not port else port, announce)


def _optuna(target: Path, host: str, port: int, storage: str | None, announce: Any) -> None:
    import optuna_dashboard

    from jobs import study as study_lib

    meta = json.loads((target / "sweep.json").read_text())
    url = storage or meta["storage"]
    opened = study_lib.open_storage(url)  # a bad or unreachable URL: named before serving
    announce(
        f"graft: optuna-dashboard on study {meta['study']} ({url}) at "
        f"http://{host}:{port}/dashboard/  (Ctrl-C stops)"
    )
    sys.stdout.flush()
    optuna_dashboard.run_server(opened, host=host, port=port)


def _tensorboard(target: Path, host: str, port: int, announce: Any) -> None:
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(target), "--host", host, "--port", str(port)])
    url = board.launch()  # serves from a thread of its own
    announce(f"graft: TensorBoard on {target} at {url}  (Ctrl-C stops)")
    sys.stdout.flush()
    while True:
        time.sleep(3600)
