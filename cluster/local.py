"""`graft cluster up|down|status`: a real multi-process Ray cluster on this machine.

    graft cluster up --num-cpus 2 --workers 1     # head + 1 worker node, free loopback ports
    graft cluster status
    graft cluster down                            # stops only what `up` started

Each node is a `ray start --block` process in its own session; its reaper takes the
node's Ray processes down with it, so `down` stops exactly the nodes `up` started (never
`ray stop`, which would kill every Ray on the machine). The state (addresses, PIDs)
lives in $GRAFT_HOME/cluster.json (default ~/.graft).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cluster.connect import DRIVER_ENV, enable_token_auth, free_port, worker_env

STATE_FILE = "cluster.json"


def home() -> Path:
    return Path(os.environ.get("GRAFT_HOME", Path.home() / ".graft"))


def state_path() -> Path:
    return home() / STATE_FILE


def read_state() -> dict[str, Any] | None:
    path = state_path()
    return json.loads(path.read_text()) if path.is_file() else None


def _alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ray() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.is_file() else "ray"


def _node_ports() -> list[str]:
    """Every port a node opens besides the head's GCS, dashboard and client server: 0,
    so each process binds one the kernel gives it (two nodes on one host never collide,
    and no port is picked ahead for another process to take first). Only the dashboard
    agent's has a fixed default (52365) to override; Redis's 6379 is never among them."""
    return [
        "--node-manager-port=0",
        "--object-manager-port=0",
        "--dashboard-agent-listen-port=0",
        "--dashboard-agent-grpc-port=0",
        "--metrics-export-port=0",
        "--runtime-env-agent-port=0",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return True
        except urllib.error.HTTPError as e:  # 401/403: up, and asking for the token
            if e.code < 500:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _alive_nodes(dashboard: str) -> int:
    enable_token_auth()  # before Ray reads the auth mode
    from ray.util.state import list_nodes

    return sum(
        1
        for n in list_nodes(address=dashboard, raise_on_missing_output=False)
        if n.state == "ALIVE"
    )


def _node_failed(i: int, proc: subprocess.Popen[bytes], logs: Path) -> str | None:
    """Why node ``i`` is gone, if its `ray start --block` exited."""
    if proc.poll() is None:
        return None
    log = logs / f"node-{i}.log"
    what = "the Ray head" if i == 0 else f"worker node {i}"
    return (
        f"{what} exited with code {proc.returncode} while starting; {log} ends:\n{_log_tail(log)}"
    )


def ensure_token(env: dict[str, str]) -> Path | None:
    """The token the nodes of a new cluster share: RAY_AUTH_TOKEN, the file at
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, made (mode 600) where none exists yet, as
    `ray.init` does for an embedded cluster. Returns the file it wrote, if any."""
    if env.get("RAY_AUTH_TOKEN"):
        return None
    if given := env.get("RAY_AUTH_TOKEN_PATH"):
        if not Path(given).is_file():
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={given}: no such file (the cluster's token)")
        return None
    path = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if path.is_file():
        return None
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, like Ray's own generator
    return path


def up(num_cpus: int, workers: int, *, timeout_s: float = 120) -> dict[str, Any]:
    """Start a head (``num_cpus``) and ``workers`` worker nodes (``num_cpus`` each)."""
    current = read_state()
    if current and any(_alive(p) for p in current["pids"]):
        raise RuntimeError(
            f"a graft cluster is already up ({current['dashboard']}); `graft cluster down` first"
        )
    home().mkdir(parents=True, exist_ok=True)
    logs = home() / "logs"
    logs.mkdir(exist_ok=True)
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    # Token auth, as Ray 2.60's default; nodes and clients send the token only with
    # RAY_AUTH_MODE=token, and `ray start --head` makes no token where there is none.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop(DRIVER_ENV, None)  # (an embedded driver's identity: this cluster outlives it)
    # Every node starts with the env graft gives its workers (recorded in the state): a
    # driver on this machine with the same env needs no runtime env, so the workers the
    # nodes keep started take its gang (cluster.connect).
    env.update(worker_env())
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"] == "token":
        ensure_token(env)
    # Jobs run `python -m cluster.cli ...` on the head: the same Python as this graft.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
        "--block",
    ]
    commands = [
        [
            _ray(),
            "start",
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            *common,
            *_node_ports(),
        ]
    ]
    commands += [
        [_ray(), "start", f"--address={address}", *common, *_node_ports()] for _ in range(workers)
    ]
    pids: list[int] = []
    state = {
        "address": address,
        "dashboard": dashboard,
        "pids": pids,
        "num_cpus": num_cpus,
        "workers": workers,
        "worker_env": worker_env(),
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, command in enumerate(commands):
            log = (logs / f"node-{i}.log").open("w")
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            procs.append(proc)
            pids.append(proc.pid)
            state_path().write_text(json.dumps(state, indent=2))
            if i == 0 and not _wait_http(f"{dashboard}/api/version", timeout_s, proc):
                raise RuntimeError(
                    _node_failed(0, proc, logs)
                    or f"the Ray head did not come up in {timeout_s:.0f}s; see {logs / 'node-0.log'}"
                )
        deadline = time.time() + timeout_s
        while _alive_nodes(dashboard) < workers + 1:
            for i, proc in enumerate(procs):
                if failed := _node_failed(i, proc, logs):
                    raise RuntimeError(failed)
            if time.time() > deadline:
                raise RuntimeError(
                    f"only {_alive_nodes(dashboard)} of {workers + 1} nodes came up in "
                    f"{timeout_s:.0f}s; see {logs}"
                )
            time.sleep(1)
    except BaseException:
        down()
        raise
    state["started"] = time.time()
    state_path().write_text(json.dumps(state, indent=2))
    return state


def down(grace_s: float = 5) -> list[int]:
    """Stop the nodes `up` started (worker nodes first); returns their PIDs."""
    state = read_state()
    if not state:
        return []
    pids = list(reversed(state["pids"]))
    # Worker nodes first, each gone before the next: a worker drains through the head's
    # GCS on the way out, and waits for it if the head is already down.
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)  # the node's `ray start` and everything it started
        except ProcessLookupError:
            continue
        deadline = time.time() + grace_s
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    state_path().unlink(missing_ok=True)
    return pids


def status() -> dict[str, Any] | None:
    state = read_state()
    if not state:
        return None
    state = dict(state)
    state["alive"] = [p for p in state["pids"] if _alive(p)]
    try:
        state["nodes"] = _alive_nodes(state["dashboard"])
    except Exception as e:  # the dashboard is down or refuses us
        state["nodes"] = None
        state["error"] = str(e).splitlines()[0]
    return state


def token_help() -> str:
    token = Path.home() / ".ray" / "auth_token"
    return (
        f"token auth: the cluster's token is in {token} (Ray 2.60 turns token auth on); "
        f"clients on this machine use it as is, elsewhere set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    )
