"""Ray Train pieces that a fixed, embedded cluster has no use for, made lean.

Imported by Ray Train's controller process (it unpickles the scaling policy), so it
imports nothing of graft's and nothing heavy.
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


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
