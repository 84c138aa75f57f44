"""Ray Train pieces that a fixed, embedded cluster has no use for, made lean.

Imported by Ray Train's controller process (it unpickles the scaling policy and, on the
embedded cluster, is a ``LeanController``), so it imports nothing of graft's and
nothing that process does not import anyway.
"""

from __future__ import annotations

from typing import Any

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
