"""`graft cluster up` pieces: the ports it picks ahead, the token its nodes share, and
what it says when a node cannot start. Each fails on the bug it was written for."""

from __future__ import annotations

import random
import socket
import stat
import time
from pathlib import Path

import pytest

from cluster import local
from cluster.connect import RESERVED_PORTS, ephemeral_range, free_port
from tests.conftest import fresh_python


def test_ports_picked_ahead_lie_outside_the_ephemeral_range() -> None:
    """A port picked now and bound later by a Ray node was lost in CI to an outgoing
    connection (the kernel gives ephemeral ports to those): `only 1 of 2 nodes came up`.
    Picks now stay out of that range, and away from Redis and Ray's fixed defaults."""
    low, high = ephemeral_range()
    picks = [free_port(random.Random(seed)) for seed in range(300)]
    assert not [p for p in picks if low <= p <= high]
    assert not set(picks) & RESERVED_PORTS and 6379 not in picks
    assert len(set(picks)) > 250  # random, so two clusters started together rarely meet


def test_a_port_in_use_is_never_picked() -> None:
    # The first pick of this seed, held by someone else: the next pick is another port.
    first = free_port(random.Random(7))
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert free_port(random.Random(7)) != first


def test_nodes_bind_ports_of_their_own_choosing() -> None:
    """Besides the head's GCS, dashboard and client ports, a node names no port: each
    process binds one the kernel gives it, so nothing picked ahead can be taken."""
    flags = local._node_ports()
    assert flags and all(f.endswith("=0") for f in flags)
    # The dashboard agent's fixed default (52365) would collide between two nodes.
    assert "--dashboard-agent-listen-port=0" in flags
    assert "--min-worker-port=0" in flags and "--max-worker-port=0" in flags


def test_a_new_machine_gets_a_token_that_only_its_user_reads(tmp_path: Path) -> None:
    """`ray start --head` with RAY_AUTH_MODE=token and no token exits at once (Ray 2.60):
    `graft cluster up` on a fresh machine failed until an embedded run had made one."""
    env = {"HOME": str(tmp_path)}
    made = local.ensure_token(env)
    assert made == tmp_path / ".ray" / "auth_token"
    assert len(made.read_text()) == 64 and stat.S_IMODE(made.stat().st_mode) == 0o600
    token = made.read_text()
    assert local.ensure_token(env) is None and made.read_text() == token  # kept as is
    assert local.ensure_token({"HOME": str(tmp_path / "x"), "RAY_AUTH_TOKEN": "a" * 64}) is None
    assert not (tmp_path / "x").exists()
    with pytest.raises(RuntimeError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        local.ensure_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})


def test_a_process_that_turned_token_auth_on_can_still_start_an_embedded_cluster(
    tmp_path: Path,
) -> None:
    """enable_token_auth (joining a `graft cluster up` cluster) set RAY_AUTH_MODE=token
    after Ray had read its config at import: an embedded cluster started later in the
    same process ran with token auth while its own driver sent none, and ray.init failed
    (seen when a test that joins ran before the session's cluster started)."""
    import os

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("b" * 64)
    code = (
        "import ray\n"
        "from cluster.connect import connect, enable_token_auth\n"
        "from conf.schema import ClusterConfig, ScalingConfig\n"
        "assert enable_token_auth()\n"
        "connect(ClusterConfig(num_cpus=1, dashboard=False), ScalingConfig(num_workers=1))\n"
        "print(ray.get(ray.remote(lambda: 'answered').remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_gcs_rpc_server_reconnect_timeout_s="5")
    assert fresh_python(code, env=env).strip() == "answered"


def test_a_head_that_cannot_bind_its_port_is_reported_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race, provoked: the dashboard port picked for the head is taken before the
    head binds it. `up` says which node exited and shows its log, in seconds (it used
    to wait out its whole timeout and say only that the head did not come up)."""
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "graft"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([free_port(), port])  # the GCS's, then the dashboard's
        monkeypatch.setattr(local, "free_port", lambda: next(picks, None) or free_port())
        started = time.time()
        with pytest.raises(RuntimeError, match="the Ray head exited with code") as failed:
            local.up(1, 0, timeout_s=300)
    assert time.time() - started < 120
    assert f"{port} because it's already occupied" in str(failed.value)  # the log's tail
    assert local.read_state() is None  # nothing left behind: `down` ran


def test_the_processes_a_killed_drivers_embedded_ray_left_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process holding a file open in a dead driver's Ray session (as Ray's agents
    do, retitled) is stopped; one of a session whose driver lives is left alone."""
    import json
    import subprocess
    import sys

    from cluster import connect

    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / connect.EMBEDDED
    folder.mkdir(parents=True)

    def agent(session: Path) -> subprocess.Popen[bytes]:
        session.mkdir()
        hold = f"f = open({str(session / 'agent.log')!r}, 'w'); import time; time.sleep(120)"
        proc = subprocess.Popen([sys.executable, "-c", hold])
        deadline = time.time() + 20
        while not connect.session_processes(str(session)) and time.time() < deadline:
            time.sleep(0.05)
        return proc

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = agent(tmp_path / "session_dead")
    (folder / f"{dead.pid}.json").write_text(
        json.dumps({"driver_pid": dead.pid, "session_dir": str(tmp_path / "session_dead")})
    )
    alive = agent(tmp_path / "session_alive")
    (folder / f"{alive.pid}.json").write_text(
        json.dumps({"driver_pid": alive.pid, "session_dir": str(tmp_path / "session_alive")})
    )
    try:
        assert connect.reap_stale_embedded() == [orphan.pid]
        assert orphan.wait(timeout=10) is not None
        assert not (folder / f"{dead.pid}.json").exists()
        assert alive.poll() is None and (folder / f"{alive.pid}.json").exists()
        assert connect.reap_stale_embedded() == []
    finally:
        for proc in (orphan, alive):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("state_api", ["0", None])
def test_a_cluster_without_a_state_api_trains_without_rays_pg_cleaner(
    state_api: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the dashboard Ray Train's PlacementGroupCleaner can never see its
    controller (its state API check times out) and only holds each fit's end for 12 s:
    make_trainer leaves it out there, and keeps it where the state API answers."""
    from cluster.connect import STATE_API_ENV
    from jobs.config import compose
    from jobs.finetune import make_trainer

    if state_api is None:
        monkeypatch.delenv(STATE_API_ENV, raising=False)
    else:
        monkeypatch.setenv(STATE_API_ENV, state_api)
    trainer = make_trainer(compose(["model=tiny_bert"]), tmp_path, started=0.0)
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "BackendSetupCallback" in names  # (the rest are Ray's own)
    assert ("PlacementGroupCleanerCallback" in names) == (state_api is None)
    assert "DatasetsCallback" not in names  # (no Ray Datasets: no DatasetManager actor)


def test_reaping_goes_on_until_a_dead_drivers_session_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind a flaky recovery test: a process told to stop starts another of
    the session first (as a stopping raylet's workers and agents do); one pass over the
    process table left that one running. Provoked here: on SIGTERM the 'raylet' starts a
    'worker' holding a file in the session, then exits."""
    import json
    import subprocess
    import sys

    from cluster import connect

    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / connect.EMBEDDED
    folder.mkdir(parents=True)
    session = tmp_path / "session_dead"
    session.mkdir()
    child = f"f = open({str(session / 'worker.log')!r}, 'w'); import time; time.sleep(120)"
    raylet = (
        "import signal, subprocess, sys, time\n"
        "def stop(*_):\n"
        f"    subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"f = open({str(session / 'raylet.log')!r}, 'w')\n"  # (its handler is in place)
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", raylet])
    deadline = time.time() + 20
    while not (session / "raylet.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / f"{dead.pid}.json").write_text(
        json.dumps({"driver_pid": dead.pid, "session_dir": str(session)})
    )
    try:
        stopped = connect.reap_stale_embedded()
        assert proc.pid in stopped and len(stopped) == 2  # the raylet and what it started
        time.sleep(0.5)
        assert connect.session_processes(str(session)) == []
    finally:
        proc.kill()
        proc.wait()
        for left in connect.session_processes(str(session)):
            left.kill()


def test_a_driver_is_told_apart_from_a_later_process_given_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver is named by pid and start time: a dead one, a zombie, and a live process
    that has its pid but started later are not it (the reaper then stops that dead
    driver's session, where a bare pid check took the newcomer for the driver)."""
    import json
    import os
    import subprocess
    import sys

    from cluster import connect

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    zombie = subprocess.Popen(["true"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        assert connect.identity_alive(connect.driver_identity(live.pid))
        assert connect.identity_alive(connect.driver_identity(os.getpid()))
        deadline = time.time() + 10  # (it exits; nobody waits for it yet)
        while zombie_status(zombie.pid) != "zombie" and time.time() < deadline:
            time.sleep(0.05)
        assert zombie_status(zombie.pid) == "zombie"
        assert not connect.identity_alive(connect.driver_identity(zombie.pid))
        assert not connect.identity_alive(f"{dead.pid}:0.0")
        reused = f"{live.pid}:{float(connect.driver_identity(live.pid).split(':')[1]) - 60!r}"
        assert not connect.identity_alive(reused)

        monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
        folder = tmp_path / "home" / connect.EMBEDDED
        folder.mkdir(parents=True)
        session = tmp_path / "session_dead"
        session.mkdir()
        hold = f"f = open({str(session / 'agent.log')!r}, 'w'); import time; time.sleep(120)"
        orphan = subprocess.Popen([sys.executable, "-c", hold])
        deadline = time.time() + 20
        while not connect.session_processes(str(session)) and time.time() < deadline:
            time.sleep(0.05)
        record = {"driver_pid": live.pid, "driver": reused, "session_dir": str(session)}
        (folder / f"{live.pid}.json").write_text(json.dumps(record))
        assert connect.reap_stale_embedded() == [orphan.pid]
        assert orphan.wait(timeout=10) is not None and live.poll() is None
    finally:
        for proc in (live, zombie):
            proc.kill()
            proc.wait()


def zombie_status(pid: int) -> str:
    import psutil

    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return "gone"


@pytest.mark.parametrize("driver", ["dead", "alive", "remote"])
def test_a_worker_whose_driver_died_stops_before_writing(tmp_path: Path, driver: str) -> None:
    """The race behind test_a_killed_and_a_preempted_driver failing in CI: the workers
    of a SIGKILLed driver trained on (for a minute, until their GCS client gave up),
    logging steps into the run directory the rerun was taking over. Every rank now
    checks its embedded driver before writing; a worker of a remote cluster has none."""
    import os
    import subprocess
    import sys

    from cluster import connect

    gone = subprocess.Popen(["true"])
    gone.wait()
    env = dict(os.environ)
    env.pop(connect.DRIVER_ENV, None)
    if driver != "remote":
        pid = gone.pid if driver == "dead" else os.getpid()
        env[connect.DRIVER_ENV] = f"{pid}:0.0" if driver == "dead" else connect.driver_identity(pid)
    out = tmp_path / "written"
    code = (
        "from jobs import preempt\n"
        "preempt.exit_if_driver_gone()\n"
        f"open({str(out)!r}, 'w').write('step 6')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],  # (the repository: `jobs` imports from there)
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if driver == "dead":
        assert done.returncode == 1 and not out.exists()
        assert f"the driver (pid {gone.pid}) is gone" in done.stderr
    else:
        assert done.returncode == 0 and out.read_text() == "step 6", done.stderr


def test_an_unset_address_joins_only_a_live_answering_local_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`graft finetune` with no cluster.address joins the cluster `graft cluster up`
    runs, but never a stale state: a dead head, or a live pid where nothing answers (a
    pid reused by another process); and never when cluster.reuse_local=false or an
    address is given."""
    import json
    import os
    import sys
    import types

    from cluster.connect import join_local
    from conf.schema import ClusterConfig

    # This process is not connected to Ray (an earlier test in it may have been).
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    assert join_local(ClusterConfig()) is None  # no state at all
    (tmp_path / "home").mkdir()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # (nothing listens there once closed)
    state = {"address": f"127.0.0.1:{port}", "dashboard": "", "pids": [2**22 + 17]}
    local.state_path().write_text(json.dumps(state))
    assert join_local(ClusterConfig()) is None  # its head is gone
    local.state_path().write_text(json.dumps({**state, "pids": [os.getpid()]}))
    assert join_local(ClusterConfig()) is None  # alive, but no Ray answers at the address
    with socket.socket() as gcs:  # something that speaks gRPC's first frame
        gcs.bind(("127.0.0.1", port))
        gcs.listen()

        def answer() -> None:
            conn, _ = gcs.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

        import threading

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        assert join_local(ClusterConfig()) == f"127.0.0.1:{port}"
        server.join(5)
    connected = types.SimpleNamespace(is_initialized=lambda: True)  # (a connected process)
    monkeypatch.setitem(sys.modules, "ray", connected)
    assert join_local(ClusterConfig()) is None  # connect() keeps the caller's Ray
    assert join_local(ClusterConfig(reuse_local=False)) is None
    assert join_local(ClusterConfig(address="10.0.0.9:6380")) is None


def test_the_embedded_head_leaves_out_the_dashboard_only_where_none_is_asked_for() -> None:
    """connect's _lean_head: cluster.dashboard=true keeps Ray's dashboard start,
    cluster.log_to_driver=true its log monitor; Ray's own functions are back afterwards."""
    import ray._private.node
    import ray._private.services as services

    from cluster.connect import _lean_head
    from conf.schema import ClusterConfig

    node = ray._private.node.Node
    ray_dashboard, ray_monitor, ray_logs = (
        services.start_api_server,
        node.start_monitor,
        node.start_log_monitor,
    )
    with _lean_head(ClusterConfig(dashboard=True, log_to_driver=True)):
        assert services.start_api_server is ray_dashboard
        assert node.start_log_monitor is ray_logs
        assert node.start_monitor is not ray_monitor
    with _lean_head(ClusterConfig(dashboard=False)):
        assert services.start_api_server is not ray_dashboard
        assert node.start_log_monitor is not ray_logs
    assert services.start_api_server is ray_dashboard
    assert node.start_monitor is ray_monitor and node.start_log_monitor is ray_logs


def _write_module(where: Path, name: str, body: str) -> None:
    (where / f"{name}.py").write_text(body)


def test_modules_import_on_their_own_thread_while_the_block_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """connect(meanwhile=...): what the driver imports next comes in on a thread while
    ray.init waits; the block's end waits for it, so the module is whole afterwards."""
    import sys
    import threading

    from cluster.connect import importing

    _write_module(
        tmp_path,
        "graft_slow_mod",
        "import threading, time\nTHREAD = threading.current_thread().name\ntime.sleep(0.3)\nDONE = True\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "graft_slow_mod", raising=False)
    seen_during: list[bool] = []
    with importing(["graft_slow_mod"]):
        time.sleep(0.1)
        seen_during.append(any(t.name == "graft-imports" for t in threading.enumerate()))
    module = sys.modules["graft_slow_mod"]
    assert module.DONE and module.THREAD == "graft-imports"
    assert module.THREAD != threading.current_thread().name and seen_during == [True]
    assert not any(t.name == "graft-imports" for t in threading.enumerate())  # joined


def test_an_import_error_is_raised_after_the_block_and_the_blocks_own_error_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.connect import importing

    monkeypatch.syspath_prepend(str(tmp_path))
    ran = []
    with pytest.raises(ModuleNotFoundError, match="graft_no_such_module"):
        with importing(["graft_no_such_module"]):
            ran.append(True)
    assert ran == [True]  # the block ran in full before the error came
    with pytest.raises(ValueError, match="the block's"):
        with importing(["graft_no_such_module"]):
            raise ValueError("the block's")
    with importing([]):  # nothing to import: no thread
        pass
