"""Ray Train pieces that a fixed, embedded cluster has no use for, made lean.

Imported by Ray Train's controller process (it unpickles the scaling policy and, on the
embedded cluster, is a ``LeanController``), so it imports nothing of graft's and
nothing that process does not import anyway.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group import WorkerGroup


class NoAutoscalerScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy, minus its requests to Ray Data's
    AutoscalingCoordinator: a detached actor (a process of its own, ~1.5 s of CPU at
    every fit's start) that tells an autoscaler what the gang needs. A local cluster
    started by graft has no autoscaler; a remote one keeps Ray's own policy."""

    def after_controller_start(self, train_run_context: Any) -> None:
        return None

    def _maybe_send_resource_request(self) -> None:
        return None

    def _send_resource_request(self) -> None:
        return None

    def _cancel_resource_request(self) -> None:
        return None


class InheritingWorkerGroup(WorkerGroup):
    """Ray Train's worker group, whose workers take the raylet's environment as it is.

    Ray Train gives each gang worker a runtime env holding the ``RAY_TRAIN_*`` variables
    set in its controller's environment. A ``LeanController`` runs with no runtime env
    of its own on graft's embedded cluster, whose raylet (started by the driver) already
    holds those same values, so its workers need none either and inherit them; without
    a runtime env a worker may also take an idle process the raylet has already started
    (on 2 cores the prestarted ones go to the controller and its synchronization actor).
    A runtime env given in the run config (``RunConfig(worker_runtime_env=...)``) is kept
    as given."""

    @staticmethod
    def _get_worker_runtime_env(custom_runtime_env: Any) -> Any:
        return dict(custom_runtime_env)


class LeanController(TrainController):
    """Ray Train's controller with an ``InheritingWorkerGroup``. Started by the driver
    (jobs.finetune) only where the raylet's environment holds every variable Ray Train
    would have propagated, with the value the driver has (on graft's embedded cluster);
    anywhere else Ray Train starts its own controller."""

    worker_group_cls = InheritingWorkerGroup


@dataclasses.dataclass
class LeanTorchConfig(BackendConfig):
    """Ray Train's ``TorchConfig`` (same fields, same process group), in a module the
    controller unpickles without importing torch: ``ray.train.torch`` imports it, ~1.7 s
    of the controller's CPU before it starts the gang, on the path to the first step.
    Its torch calls are Ray Train's own, run on the workers (which import torch anyway)
    by name (``_on_worker``)."""

    backend: str = "gloo"
    init_method: str = "env"
    timeout_s: int = 1800

    @classmethod
    def of(cls, given: Any) -> LeanTorchConfig:
        """The lean twin of a ``TorchConfig``."""
        if given.init_method != "env":
            raise ValueError(
                f"LeanTorchConfig: init_method {given.init_method!r}; only 'env' is supported"
            )
        # (TorchTrainer has filled in its backend: nccl with GPUs, else gloo)
        return cls(backend=given.backend, init_method="env", timeout_s=given.timeout_s)

    @property
    def backend_cls(self) -> type[Backend]:
        return LeanTorchBackend

    @property
    def train_func_context(self) -> Any:
        # Read by the driver, which has torch; the train function carries it to the workers.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "init_method": self.init_method,
            "timeout_s": self.timeout_s,
        }


def _on_worker(name: str, **kwargs: Any) -> Any:
    """Ray Train's worker-side torch setup function ``name`` (ray.train.torch.config),
    imported where it runs."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class LeanTorchBackend(Backend):
    """What Ray Train's torch backend does for a V2 gang with ``init_method="env"``:
    rank 0's address and a free port as the rendezvous, the torch.distributed variables
    on every worker, then the process group (and its teardown at the end)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        assert isinstance(backend_config, LeanTorchConfig)
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_on_worker, "_set_torch_distributed_env_vars")
        size = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _on_worker,
                    "_setup_torch_process_group",
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=size,
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(size)
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(
            _on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        timeout_s = ray_constants.env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            pass  # (Ray Train's backend logs this and goes on too; the gang is going)
