"""Connect the driver to Ray: start an embedded local cluster, or join an existing one.

    python -c "from cluster.connect import connect; from conf.schema import *; \
        connect(ClusterConfig(), ScalingConfig())"

Nothing here runs at import time. The embedded cluster binds to loopback on free ports
(Ray picks the GCS port itself; it is never Redis's 6379).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from conf.schema import ClusterConfig, ConfigError, ScalingConfig

# Environment every Ray worker gets: quiet, offline-friendly libraries.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    "PYTHONWARNINGS": "ignore",
}
# An embedded cluster's extras (one machine, no node is ever drained): Ray Train's
# preemption watcher polls for node drains (an actor per fit, ~2 s of CPU) and is off.
# Without the dashboard there is no state API: Ray Train's PlacementGroupCleaner cannot
# see its controller (its check times out) and only holds each fit's teardown ~12 s
# (measured), so graft leaves it out there (STATE_API_ENV="0", read by make_trainer).
# Without the dashboard nothing can read Ray's metrics either: Ray Train's metrics
# callbacks and the core workers' metrics collection are off there too.
STATE_API_ENV = "GRAFT_STATE_API"
EMBEDDED_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # What Ray Train sets for its controller unless given: with it in the raylet's
    # environment, the controller's own runtime env adds nothing (jobs.lean.LeanController).
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
}
# What the driver imports once it is connected (jobs.finetune.make_trainer: Ray Train,
# ~1.1 s of CPU): imported on a thread while ray.init waits on the processes it starts.
TRAINER_MODULES = ("ray.train", "ray.train.torch", "jobs.lean")
# Modules ray.init imports itself that Ray Train imports too (Ray 2.60): imported before
# the thread starts, so the two threads never import the same module at once.
INIT_SHARED = ("pydantic", "ray._common.usage.usage_lib", "ray.dashboard")
# The embedded cluster this process started: its session directory and the
# environment its raylet was started with (this process's at ray.init).
_embedded: tuple[str, dict[str, str]] | None = None


def raylet_env() -> dict[str, str] | None:
    """The environment of the raylet of the cluster this process is on, where this
    process started it (the embedded cluster): every worker process that raylet starts
    without a runtime env has these values. None anywhere else (a cluster joined, one a
    caller started, or none)."""
    import ray

    node = ray._private.worker._global_node if ray.is_initialized() else None
    if _embedded is None or node is None or node.get_session_dir_path() != _embedded[0]:
        return None
    return dict(_embedded[1])


# An embedded cluster's workers share its driver's fate: "<pid>:<start time>" of the
# driver, which every rank checks at each step boundary (jobs.preempt.driver_gone). A
# driver killed with SIGKILL takes Ray's GCS and raylet with it, but its workers can
# live on for a minute (until their GCS client gives up), training and writing metrics
# and checkpoints into the run directory that the rerun is about to take over.
DRIVER_ENV = "GRAFT_DRIVER"
NO_DASHBOARD_ENV = {STATE_API_ENV: "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
PASS_THROUGH = (
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "GRAFT_CACHE",
    "TORCH_EXTENSIONS_DIR",
    "HF_HOME",
)


def enable_token_auth() -> bool:
    """Ray 2.60 clusters want a token; a client sends it only when RAY_AUTH_MODE=token.
    Turn that on when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and the user did not choose a mode. True if a token is set up."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        raylet = sys.modules.get("ray._raylet")
        if raylet is not None:
            # Ray read the mode into its config when it was imported: without a new read
            # this process would send no token, even to a cluster it starts itself.
            raylet.Config.initialize("")
        return True
    return False


# Ports no graft-started server may take: Redis, and Ray's fixed defaults (another Ray
# on this machine started without graft would want them).
RESERVED_PORTS = frozenset({6379, 8265, 10001, 52365, 8076, 8080})


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local port of outgoing connections (Linux)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; IANA's 49152-65535 is the other common one


def free_port(rng: random.Random | None = None) -> int:
    """A loopback TCP port that is free now and outside the kernel's ephemeral range.

    A port picked now and bound later by a server process can be lost in between. From
    the ephemeral range it is lost whenever any process on the machine opens a
    connection (the kernel hands out that range as local ports: every Ray worker,
    gloo peer and database client does so all the time); outside it only another
    explicit pick can take it. Ray picks its own random ports the same way."""
    rng = rng or random.SystemRandom()
    low, high = ephemeral_range()
    candidates = [r for r in ((high + 1, 65535), (20000, low - 1)) if r[1] - r[0] >= 100]
    for _ in range(200):
        start, end = rng.choice(candidates) if candidates else (1024, 65535)
        port = rng.randint(start, end)
        if port in RESERVED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the whole space is busy: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_capacity(scaling: ScalingConfig, *, cpus: float, gpus: float, where: str) -> None:
    need_cpus = scaling.num_workers * scaling.cpus_per_worker
    need_gpus = scaling.num_workers * scaling.gpus_per_worker
    if need_cpus > cpus:
        raise ConfigError(
            "scaling.num_workers",
            f"{scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs = {need_cpus} CPUs, but {where} has {cpus:g}",
        )
    if need_gpus > gpus:
        raise ConfigError(
            "scaling.gpus_per_worker",
            f"{scaling.num_workers} workers x {scaling.gpus_per_worker} GPUs = {need_gpus} GPUs, but {where} has {gpus:g}",
        )


def probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``: Ray's own
    connect retries for up to 10 minutes. "auto" (the local node's cluster) is not probed."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            "cluster.address", f"{address!r} is not host:port, ray://host:port or 'auto'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as conn:
            reply = _http2_reply(conn)
    except OSError as e:
        raise ConnectionError(
            f"cluster.address: nothing answers at {address!r} ({e.strerror or e}); "
            "is the Ray head running, and is this its GCS port (host:port) or Ray client port (ray://host:10001)?"
        ) from None
    if len(reply) < 4 or reply[3] != 0x04:  # Ray's GCS and client server speak gRPC
        raise ConnectionError(
            f"cluster.address: something answers at {address!r}, but it is not Ray (no gRPC "
            f"reply; it sent {reply[:16]!r}): another server has this port; give the Ray "
            "head's GCS address (host:port, as `ray start --head` or `graft cluster status` "
            "prints it) or its client port (ray://host:10001)"
        )


def _http2_reply(conn: socket.socket) -> bytes:
    """The first bytes a server sends after an HTTP/2 preface and empty SETTINGS frame:
    a gRPC server answers with its own SETTINGS frame (type 4 in byte 3)."""
    conn.settimeout(3)
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    try:
        return conn.recv(64)
    except OSError:
        return b""


def token_source() -> str:
    """Where this process's Ray token comes from, for error messages."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file in RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return f"{default}"
    return "nowhere (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


def _same_address(a: str, b: str) -> bool:
    """Whether two host:port addresses name the same GCS, hosts resolved to IPs (so a
    name and its IP match; 127.0.0.1 and the node's own IP do not). ray:// client
    addresses compare as given."""
    if a.startswith("ray://") or b.startswith("ray://"):
        return a == b

    def key(address: str) -> tuple[str, str]:
        host, _, port = address.rpartition(":")
        try:
            return socket.gethostbyname(host), port
        except OSError:
            return host, port

    return key(a) == key(b)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------ embedded clusters
# An embedded cluster is started by its driver (ray.init(address="local")). A driver
# that exits stops it; one killed with SIGKILL takes Ray's GCS and raylet with it, but
# not every process they started (the dashboard and runtime-env agents live on,
# orphaned). Each embedded cluster is recorded in $GRAFT_HOME/embedded/<driver pid>.json
# with its session directory; the next embedded start stops what a dead driver's
# session left running, and only that (never another Ray on the machine).
EMBEDDED = "embedded"


def _embedded_dir() -> Path:
    return Path(os.environ.get("GRAFT_HOME", Path.home() / ".graft")) / EMBEDDED


def driver_identity(pid: int) -> str:
    """``"<pid>:<start time>"``: a process, told apart from a later one given its pid."""
    import psutil

    return f"{pid}:{psutil.Process(pid).create_time()!r}"


def identity_alive(identity: str) -> bool:
    """Whether the process ``driver_identity`` named still runs (not a zombie, and not
    another process that got its pid since)."""
    import psutil

    pid, _, started = identity.partition(":")
    try:
        proc = psutil.Process(int(pid))
        return proc.create_time() == float(started) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _record_embedded(session_dir: str) -> Path:
    import atexit

    folder = _embedded_dir()
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{os.getpid()}.json"
    record.write_text(
        json.dumps(
            {
                "driver_pid": os.getpid(),
                "driver": driver_identity(os.getpid()),
                "session_dir": session_dir,
            }
        )
    )
    atexit.register(record.unlink, missing_ok=True)
    return record


def session_processes(session_dir: str) -> list[Any]:
    """The processes of a Ray session: those that name its directory on their command
    line or hold a file open in it (Ray's agents retitle themselves, but keep their
    logs open)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if session_dir in " ".join(proc.info["cmdline"] or ()) or any(
                f.path.startswith(session_dir) for f in proc.open_files()
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def reap_stale_embedded() -> list[int]:
    """Stop what the embedded clusters of dead drivers left running; the pids stopped."""
    import psutil

    stopped: list[int] = []
    folder = _embedded_dir()
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        alive = (
            identity_alive(info["driver"])
            if "driver" in info  # (an older record has the pid alone)
            else psutil.pid_exists(info["driver_pid"])
        )
        if alive and info["driver_pid"] != os.getpid():
            continue  # its driver still runs (its cluster is in use)
        # Again until none is left: a process being stopped can start others first (a
        # raylet told to stop still has workers and agents starting), which one pass
        # over the process table misses.
        procs: list[Any] = []
        for _ in range(5):
            found = session_processes(info["session_dir"])
            if not found:
                break
            for proc in found:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
            _, alive = psutil.wait_procs(found, timeout=5)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
            procs += found
        stopped += [p.pid for p in procs]
        if procs:
            print(
                f"graft: stopped {len(procs)} Ray process(es) left by the embedded cluster of a "
                f"killed driver (pid {info['driver_pid']}, {info['session_dir']})",
                flush=True,
            )
        record.unlink(missing_ok=True)
    return stopped


CONNECT_RETRY_MS = 20  # (see _system_config)
NODE_POLL_S = 0.02  # how often _lean_head asks the GCS whether the raylet has registered


def _system_config(cluster: ClusterConfig) -> dict[str, Any]:
    """Ray's settings for an embedded cluster."""
    settings: dict[str, Any] = {
        # A Ray process connects to the raylet's and the object store's sockets with
        # retries 1 s apart (10 of them): the raylet's object manager, started beside its
        # object store, waited that second in 2 of 8 starts here (raylet.out: "Starting
        # object store" 1.0 s before "ObjectManager server started"). The same 10 s in
        # 20 ms steps.
        "raylet_client_connect_timeout_milliseconds": CONNECT_RETRY_MS,
        "raylet_client_num_connect_attempts": 10_000 // CONNECT_RETRY_MS,
    }
    if not cluster.dashboard:
        settings["enable_metrics_collection"] = False  # (nothing could read them)
    return settings


@contextlib.contextmanager
def _lean_head(cluster: ClusterConfig) -> Iterator[None]:
    """While ray.init starts an embedded cluster: without cluster.dashboard, no dashboard
    process at all. Ray starts one even with include_dashboard=False (its usage-stats
    module alone) and holds ray.init until it has registered: ~0.75 s of the start on 2
    cores (measured), for a process that serves nothing there. Without
    cluster.log_to_driver, no log monitor (it only streams the workers' log lines to the
    driver; they stay in Ray's log files). Never an autoscaler monitor: a fixed-size
    cluster of one machine has nothing to scale."""
    import ray._private.node
    import ray._private.services

    services, node = ray._private.services, ray._private.node.Node
    start_api_server, get_node = services.start_api_server, services.get_node
    start_monitor, start_log_monitor = node.start_monitor, node.start_log_monitor
    if not cluster.dashboard:
        services.start_api_server = lambda *args, **kwargs: (None, None)
    if not cluster.log_to_driver:
        node.start_log_monitor = lambda self: None  # type: ignore[method-assign]
    node.start_monitor = lambda self: None  # type: ignore[method-assign]
    services.get_node = _registered(get_node)
    try:
        yield
    finally:
        services.start_api_server, services.get_node = start_api_server, get_node
        node.start_monitor = start_monitor  # type: ignore[method-assign]
        node.start_log_monitor = start_log_monitor  # type: ignore[method-assign]


def _registered(
    get_node: Callable[[str, str], Any], *, wait_s: float = 30
) -> Callable[[str, str], Any]:
    """Ray's get_node(gcs_address, node_id), called once the GCS lists the node. ray.init
    asks for the new raylet's node 0.1 s after starting it, and Ray's own lookup, when
    the node is not there yet (it registers ~0.8 s after its start on 2 cores), sleeps a
    whole second before it asks again; here the GCS is asked every NODE_POLL_S. Past
    ``wait_s`` (Ray's raylet_start_wait_time_s, 30 s) or where the GCS does not answer,
    Ray's lookup is left to fail as it does."""

    def lookup(gcs_address: str, node_id: str) -> Any:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        client = GcsClient(address=gcs_address)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                if any(key.hex() == node_id for key in client.get_all_node_info(timeout=5)):
                    break
            except Exception:  # (the GCS not answering yet: Ray's lookup reports it)
                break
            time.sleep(NODE_POLL_S)
        return get_node(gcs_address, node_id)

    return lookup


def worker_env() -> dict[str, str]:
    """What every Ray worker of a graft job gets: WORKER_ENV and this process's
    PASS_THROUGH variables."""
    return dict(WORKER_ENV, **{k: os.environ[k] for k in PASS_THROUGH if k in os.environ})


def join_local(cluster: ClusterConfig) -> str | None:
    """The address of the cluster `graft cluster up` runs on this machine, where
    ``cluster`` leaves the address unset (an embedded cluster otherwise), reuse_local is
    on, and that cluster's head is alive and answers. Joining it skips the Ray start-up
    every embedded command pays."""
    if cluster.address is not None or not cluster.reuse_local:
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return None  # (a caller already connected this process: connect() uses that)
    from cluster import local

    state = local.read_state()
    if not state or not state.get("pids") or not local._alive(state["pids"][0]):
        return None
    try:
        probe(state["address"], timeout_s=2)
    except (ConnectionError, ConfigError):
        return None  # (its head is going down, or the state is stale)
    enable_token_auth()  # (`up` starts its nodes with token auth, as Ray's default)
    return str(state["address"])


def join_message(address: str) -> str:
    """What a driver that joins the `graft cluster up` cluster prints."""
    return (
        f"graft: joining the cluster `graft cluster up` runs (cluster.address={address}; "
        "cluster.reuse_local=false starts an embedded one)"
    )


def describe(found: dict[str, Any]) -> str:
    """The line a driver prints once connected."""
    dashboard = found.get("dashboard") or "off (cluster.dashboard=true starts it)"
    return f"graft: Ray at {found['address']}, dashboard {dashboard}"


@contextlib.contextmanager
def importing(modules: Sequence[str]) -> Iterator[None]:
    """Import ``modules``, in order, on a thread of their own while the block runs (the
    block waits on other processes: ray.init); the thread is joined when the block
    ends, and its import error, if any, is raised then (the block's own error first)."""
    if not modules:
        yield
        return
    import importlib
    import threading

    for name in INIT_SHARED:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
        except BaseException as e:  # raised on the caller's thread, below
            failed.append(e)

    thread = threading.Thread(target=run, name="graft-imports", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]


def connect(
    cluster: ClusterConfig, scaling: ScalingConfig, *, meanwhile: Sequence[str] = ()
) -> dict[str, Any]:
    """Start or join Ray; returns {"address", "dashboard"}. Checks the workers fit first
    (embedded: before starting Ray; remote: right after connecting). ``meanwhile``:
    modules to import while ray.init starts or reaches the cluster (``importing``)."""
    import ray

    env = worker_env()
    if ray.is_initialized():  # a caller (a test, a notebook) already connected
        if cluster.address is not None and cluster.address != "auto":
            # The config names a cluster: it must be the one this process is on.
            probe(cluster.address)
            current = ray.get_runtime_context().gcs_address
            if not _same_address(cluster.address, current):
                raise ConfigError(
                    "cluster.address",
                    f"this process is already connected to Ray at {current}, not "
                    f"{cluster.address}; run from a fresh process (the graft CLI) to use another cluster",
                )
        resources = ray.cluster_resources()
        check_capacity(
            scaling,
            cpus=resources.get("CPU", 0),
            gpus=resources.get("GPU", 0),
            where="the Ray cluster",
        )
        return {
            "address": ray.get_runtime_context().gcs_address,
            "dashboard": ray._private.worker.get_dashboard_url(),
        }
    if cluster.address is None:
        num_cpus = cluster.num_cpus or os.cpu_count() or 1
        check_capacity(
            scaling,
            cpus=num_cpus,
            gpus=_local_gpus(),
            where=f"the embedded cluster (cluster.num_cpus={num_cpus})",
        )
        reap_stale_embedded()
        env.update(EMBEDDED_ENV, **{DRIVER_ENV: driver_identity(os.getpid())})
        if not cluster.dashboard:
            env.update(NO_DASHBOARD_ENV)
        # Through this process's environment, not a runtime env: the raylet and every
        # worker it starts inherit it, so the job needs no runtime env of its own (with
        # one, each of its actors waited for a new process). Ray Train would give its
        # controller, its synchronization actor and the gang workers a runtime env (its
        # RAY_TRAIN_* and RAY_WARN_* variables, the values this environment holds):
        # jobs.finetune starts a jobs.lean.LeanController without one where the values
        # match (raylet_env), so the controller and the synchronization actor take the
        # workers Ray prestarts at init (measured on Ray 2.60).
        os.environ.update(env)
        started_with = dict(os.environ)
        with _lean_head(cluster), importing(meanwhile):
            ctx = ray.init(
                # "local": always a new cluster for this process, even where `ray start`
                # left a cluster (or its address file) on this machine.
                address="local",
                num_cpus=num_cpus,
                include_dashboard=cluster.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=cluster.dashboard_port or free_port(),
                log_to_driver=cluster.log_to_driver,
                logging_level=logging.WARNING,
                _system_config=_system_config(cluster),
            )
        node = ray._private.worker._global_node
        assert node is not None  # (ray.init just started it)
        global _embedded
        _embedded = (node.get_session_dir_path(), started_with)
        _record_embedded(node.get_session_dir_path())
    else:
        probe(cluster.address)
        # A job-wide runtime env needs workers of its own (new processes). Where the
        # nodes already have this env (`graft cluster up` started them with it), the job
        # goes without one, so what brings no runtime env of its own (a sweep's Tune
        # trial actors) takes the workers the nodes keep started; Ray Train's controller
        # and workers bring theirs (its RAY_TRAIN_* variables) and are new processes.
        from cluster import local

        state = local.read_state()
        same_env = bool(
            state
            and state.get("worker_env") == env
            and _same_address(state["address"], cluster.address)
        )
        with importing(meanwhile):
            try:
                ctx = ray.init(
                    address=cluster.address,
                    log_to_driver=cluster.log_to_driver,
                    runtime_env=None if same_env else {"env_vars": env},
                    logging_level=logging.WARNING,
                )
            except Exception as e:  # Ray raises ConnectionError, RuntimeError or auth errors here
                raise ConnectionError(
                    f"cluster.address: could not connect to Ray at {cluster.address!r}: {e}. "
                    "Check the address (host:port of the GCS, or ray://host:10001) and the token: "
                    f"this process's comes from {token_source()} (RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; the cluster's is in its head's "
                    "~/.ray/auth_token)."
                ) from None
        resources = ray.cluster_resources()
        check_capacity(
            scaling,
            cpus=resources.get("CPU", 0),
            gpus=resources.get("GPU", 0),
            where=f"the cluster at {cluster.address}",
        )
    return {"address": ray.get_runtime_context().gcs_address, "dashboard": ctx.dashboard_url}
