"""The embedded cluster made lean, on a real local Ray: Ray Train's controller as a
jobs.lean.LeanController, whose gang workers get every variable Ray Train propagates,
with the driver's values, without a runtime env of their own; a variable the driver
sets after the cluster started sends the fit back through Ray Train's own controller,
which carries it. The cluster's head runs no dashboard, no log monitor and no autoscaler
monitor.

    pytest tests/integration/test_lean_controller.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_2cpus")]

# A variable Ray Train propagates to its workers (ray.train.v2._internal.constants).
LATE = "RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S"


def _record_env(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    seen = {
        "env": {k: os.environ.get(k) for k in config["keys"]},
        "runtime_env_vars": ray.get_runtime_context().runtime_env.get("env_vars") or {},
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def _fit(out: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A 2-worker Ray Train fit made lean as make_trainer makes an embedded run's (no
    torch backend: what is tested is the worker group's); what Ray Train would have
    propagated, and what each worker saw."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from jobs.finetune import _lean_callbacks, _lean_controller

    wanted = get_env_vars_to_propagate()
    wanted.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
    out.mkdir()
    trainer = DataParallelTrainer(
        _record_env,
        train_loop_config={"keys": sorted(wanted), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name=".train", storage_path=str(out)),
    )
    _lean_callbacks(trainer, state_api=False)
    _lean_controller(trainer)
    trainer.fit()
    return wanted, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_gang_inherits_ray_trains_variables_without_a_runtime_env(tmp_path: Path) -> None:
    from jobs.finetune import controller_env_inherited

    assert controller_env_inherited()
    wanted, ranks = _fit(tmp_path / "lean")
    # The embedded cluster sets some (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 among them).
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" in wanted
    for seen in ranks:
        assert seen["env"] == wanted
        # No runtime env: Ray Train's own worker group would have given it env_vars.
        assert seen["runtime_env_vars"] == {}


def test_a_variable_set_after_the_cluster_started_reaches_the_gang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.finetune import controller_env_inherited

    monkeypatch.setenv(LATE, "77")
    assert not controller_env_inherited()
    wanted, ranks = _fit(tmp_path / "ray")
    assert wanted[LATE] == "77"
    for seen in ranks:
        assert seen["env"] == wanted
        assert seen["runtime_env_vars"][LATE] == "77"


def test_the_embedded_head_runs_no_dashboard_no_log_monitor_and_no_autoscaler() -> None:
    """(ray_2cpus starts it as graft does: cluster.dashboard and log_to_driver false.)"""
    import ray
    import ray._private.node
    import ray._private.services
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    assert node is not None and node.head
    assert ray_constants.PROCESS_TYPE_DASHBOARD not in node.all_processes
    assert ray_constants.PROCESS_TYPE_MONITOR not in node.all_processes
    assert ray_constants.PROCESS_TYPE_LOG_MONITOR not in node.all_processes
    assert ray_constants.PROCESS_TYPE_RAYLET in node.all_processes
    # Ray's own functions are back once the head is up.
    assert ray._private.services.start_api_server.__module__ == "ray._private.services"
    assert ray._private.services.get_node.__module__ == "ray._private.services"
    assert ray._private.node.Node.start_monitor.__module__ == "ray._private.node"
    assert ray._private.node.Node.start_log_monitor.__module__ == "ray._private.node"
    # The cluster still answers (ray.get of a task reaches the driver).
    assert ray.get(ray.remote(num_cpus=0)(lambda: "answered").remote()) == "answered"


def test_the_embedded_head_retries_its_connections_in_short_steps() -> None:
    """Its raylet and every process got _system_config's retry settings (read back from
    the GCS): 20 ms apart, the same 10 s in all, instead of Ray's 1 s x 10."""
    import ray

    from cluster.connect import CONNECT_RETRY_MS

    settings = ray._private.state.state.get_system_config()
    assert settings["raylet_client_connect_timeout_milliseconds"] == CONNECT_RETRY_MS
    assert settings["raylet_client_num_connect_attempts"] * CONNECT_RETRY_MS == 10_000


def test_the_node_lookup_asks_the_gcs_until_the_node_is_there() -> None:
    """_registered on this cluster's real GCS: a node it lists goes straight to Ray's
    lookup; one it never lists is asked for until wait_s, then left to Ray's lookup (which
    reports it as Ray does)."""
    import time

    import ray

    from cluster.connect import NODE_POLL_S, _registered

    asked: list[tuple[str, str]] = []

    def ray_lookup(gcs_address: str, node_id: str) -> str:
        asked.append((gcs_address, node_id))
        return "ray's answer"

    gcs = ray.get_runtime_context().gcs_address
    here = ray.get_runtime_context().get_node_id()
    assert _registered(ray_lookup)(gcs, here) == "ray's answer"
    assert asked == [(gcs, here)]

    absent = "ab" * 28  # (a node id no raylet has)
    start = time.monotonic()
    assert _registered(ray_lookup, wait_s=10 * NODE_POLL_S)(gcs, absent) == "ray's answer"
    assert time.monotonic() - start >= 10 * NODE_POLL_S  # (it kept asking the GCS)
    assert asked[-1] == (gcs, absent)


def _own_controller() -> tuple[str, bool]:
    """This fit's own controller (the actor Ray Train's context names, found by its pid
    in the GCS's actor table; a controller of an earlier fit may still be exiting):
    its process name and whether torch's library is mapped into it (read from /proc)."""
    import ray
    from ray.train.v2._internal.execution.context import get_train_context

    actor = get_train_context().controller_actor
    pid = ray._private.state.actors(actor._actor_id.hex())["Pid"]
    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    return name, "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _all_reduce(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    seen = {
        "world": dist.get_world_size(),
        "rank": dist.get_rank(),
        "backend": dist.get_backend(),
        "sum": total.item(),
        "controller": _own_controller(),
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def test_the_lean_torch_backend_sets_up_the_process_group_without_torch_in_the_controller(
    tmp_path: Path,
) -> None:
    """make_trainer's embedded gang (jobs.lean.LeanTorchConfig): a real gloo all_reduce
    across 2 workers, while the controller has not loaded torch at all.

    It is this fit's own controller that is looked at: under `-n 2` a LeanController of an
    earlier fit on this cluster was once still exiting and was counted too (a decoy of that
    name, with torch loaded, stands in for it here)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.finetune import _lean_backend, _lean_callbacks, _lean_controller
    from jobs.lean import LeanTorchConfig

    trainer = TorchTrainer(
        _all_reduce,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=".train", storage_path=str(tmp_path)),
    )
    _lean_callbacks(trainer, state_api=False)
    _lean_controller(trainer)
    _lean_backend(trainer)
    assert isinstance(trainer.train_run_context.backend_config, LeanTorchConfig)

    class LeanController:  # (named as an earlier fit's controller that is still exiting)
        def load_torch(self) -> bool:
            import torch

            return torch.tensor(1.0).item() == 1.0

    decoy = ray.remote(num_cpus=0)(LeanController).remote()
    assert ray.get(decoy.load_torch.remote())  # a process of that name, with torch in it
    trainer.fit()
    ray.kill(decoy)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    for seen in ranks:
        assert seen["world"] == 2 and seen["backend"] == "gloo"
        assert seen["sum"] == 3.0  # 1 + 2: both ranks took part
        name, has_torch = seen["controller"]
        assert name.startswith("ray::LeanController") and not has_torch


def test_the_lean_torch_config_is_ray_trains_with_its_values() -> None:
    from ray.train.torch import TorchConfig

    from jobs.lean import LeanTorchConfig

    given = TorchConfig(backend="gloo", timeout_s=77)
    assert LeanTorchConfig.of(given).to_dict() == given.to_dict()
    assert LeanTorchConfig.of(given).framework == given.framework
    assert LeanTorchConfig.of(given).train_func_context is given.train_func_context
    with pytest.raises(ValueError, match="init_method 'tcp'"):
        LeanTorchConfig.of(TorchConfig(init_method="tcp"))
