"""`graft cluster` and `graft submit/status/logs/stop/list` against a real multi-process
Ray cluster (head + 1 worker node, started by `graft cluster up`), with token auth.

    pytest tests/integration/test_jobs.py
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.connect import free_port
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def _graft(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or os.environ.copy(),
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`graft cluster up --num-cpus 1 --workers 1`; `graft cluster down` after the module.
    As on a fresh machine: a HOME with no ~/.ray, so no token yet (`up` makes it)."""
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, HOME=str(home), GRAFT_HOME=str(home / ".graft"))
    env.pop("RAY_AUTH_TOKEN", None), env.pop("RAY_AUTH_TOKEN_PATH", None)
    up = _graft("cluster", "up", "--num-cpus", "1", "--workers", "1", env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    assert (home / ".ray" / "auth_token").is_file()
    state = json.loads((Path(env["GRAFT_HOME"]) / "cluster.json").read_text())
    status = _graft("cluster", "status", env=env)
    assert "2 alive" in status.stdout and "2/2 node processes alive" in status.stdout
    yield {"env": env, **state}  # type: ignore[misc]
    down = _graft("cluster", "down", env=env)
    assert "stopped 2 node(s)" in down.stdout
    assert _graft("cluster", "status", env=env).returncode == 1
    from cluster.local import _alive

    assert not any(_alive(pid) for pid in state["pids"])  # what `up` started is gone


def _job_overrides(data_dir: Path, out: Path, name: str, steps: int) -> list[str]:
    return tiny_overrides(data_dir) + [
        "scaling.num_workers=1",
        f"train.max_steps={steps}",
        "train.eval_every=6",
        "train.checkpoint_every=6",
        f"run.output_dir={out}",
        f"run.name={name}",
    ]


def test_submit_follow_stop_list_and_rays_own_cli(
    cluster: dict, data_dir: Path, tmp_path: Path
) -> None:  # type: ignore[type-arg]
    env, dashboard = cluster["env"], cluster["dashboard"]
    done = _graft(
        "submit",
        "finetune",
        *_job_overrides(data_dir, tmp_path, "ok", 6),
        "--address",
        dashboard,
        "--wait",
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    job = next(
        line.split()[-1] for line in done.stdout.splitlines() if line.startswith("graft: submitted")
    )
    assert job.startswith("graft-finetune-ok-")
    assert f"{job} SUCCEEDED" in done.stdout
    logs = _graft("logs", job, "--address", dashboard, env=env)
    assert "graft: done" in logs.stdout and "eval_loss=" in logs.stdout
    assert (tmp_path / "ok" / "export" / "model.safetensors").is_file()
    assert [
        r
        for r in map(json.loads, (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines())
        if r.get("event") == "end"
    ]

    long = _graft(
        "submit",
        "finetune",
        *_job_overrides(data_dir, tmp_path, "long", 100000),
        "--address",
        dashboard,
        env=env,
    )
    assert long.returncode == 0, long.stderr[-2000:]
    long_job = next(
        line.split()[-1] for line in long.stdout.splitlines() if line.startswith("graft: submitted")
    )
    deadline = time.time() + 120
    while "RUNNING" not in _graft("status", long_job, "--address", dashboard, env=env).stdout:
        assert time.time() < deadline, "the long job never ran"
        time.sleep(2)
    stopped = _graft("stop", long_job, "--address", dashboard, env=env)
    assert f"{long_job} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr

    listed = _graft("list", "--address", dashboard, env=env).stdout
    assert job in listed and long_job in listed and "SUCCEEDED" in listed and "STOPPED" in listed
    # Ray's own CLI sees and reads what graft submitted (with the cluster's token).
    ray = str(Path(sys.executable).parent / "ray")
    ray_env = dict(env, RAY_AUTH_MODE="token")
    ray_list = subprocess.run(
        [ray, "job", "list", "--address", dashboard],
        capture_output=True,
        text=True,
        env=ray_env,
        timeout=60,
    )
    assert job in ray_list.stdout and long_job in ray_list.stdout, ray_list.stderr[-2000:]
    ray_logs = subprocess.run(
        [ray, "job", "logs", job, "--address", dashboard],
        capture_output=True,
        text=True,
        env=ray_env,
        timeout=60,
    )
    assert "graft: done" in ray_logs.stdout


def test_clear_errors_for_bad_addresses_and_tokens(cluster: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    env, dashboard = cluster["env"], cluster["dashboard"]
    started = time.time()
    nothing = _graft("list", "--address", f"http://127.0.0.1:{free_port()}", env=env)
    assert nothing.returncode == 2 and "nothing answers" in nothing.stderr
    assert time.time() - started < 30 and "Traceback" not in nothing.stderr

    not_ray = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler
    )
    threading.Thread(target=not_ray.serve_forever, daemon=True).start()
    try:
        other = _graft(
            "list", "--address", f"http://127.0.0.1:{not_ray.server_address[1]}", env=env
        )
    finally:
        not_ray.shutdown()
    assert other.returncode == 2 and "not a Ray dashboard" in other.stderr

    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    refused = _graft("list", "--address", dashboard, "--token-file", str(wrong), env=env)
    assert refused.returncode == 2 and "refused the token" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr

    missing = _graft(
        "list", "--address", dashboard, "--token-file", str(tmp_path / "nope"), env=env
    )
    assert missing.returncode == 2 and "--token-file: no such file" in missing.stderr

    bad_config = _graft(
        "submit", "finetune", "strategy.lora.r=0", "strategy=lora", "--address", dashboard, env=env
    )
    assert bad_config.returncode == 2 and "strategy.lora.r" in bad_config.stderr
    assert "submitted" not in bad_config.stdout  # checked here, never sent


def test_finetune_joins_the_running_local_cluster(
    cluster: dict, data_dir: Path, tmp_path: Path
) -> None:  # type: ignore[type-arg]
    """With `graft cluster up` running, `graft finetune` (no cluster.address) joins it
    instead of starting an embedded Ray, with no runtime env (its workers have the env
    `up` gave the nodes); cluster.reuse_local=false would start an embedded one."""
    from cluster.connect import worker_env

    env = cluster["env"]
    state = json.loads((Path(env["GRAFT_HOME"]) / "cluster.json").read_text())
    # (the driver's env is the nodes': the condition for no runtime env)
    assert state["worker_env"] == worker_env() and worker_env()["RAY_TRAIN_V2_ENABLED"] == "1"
    done = _graft("finetune", *_job_overrides(data_dir, tmp_path, "joined", 6), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"joining the cluster `graft cluster up` runs (cluster.address={cluster['address']}" in (
        done.stdout
    )
    port = cluster["address"].rpartition(":")[2]  # (Ray names the node by its own IP)
    assert any(
        line.startswith("graft: Ray at ") and f":{port}," in line
        for line in done.stdout.splitlines()
    ), done.stdout
    saved = (tmp_path / "joined" / "config.yaml").read_text()
    assert f"address: {cluster['address']}" in saved  # (what it ran on, for the record)
    ends = [
        r
        for r in map(json.loads, (tmp_path / "joined" / "metrics.jsonl").read_text().splitlines())
        if r.get("event") == "end"
    ]
    assert ends and ends[0]["step"] == 6
