"""Which trials a sweep keeps training: stratified asynchronous successive halving.

Plain ASHA ranks a trial at a rung against every trial that reached that rung. A
strategy that starts slowly (LoRA, a deep unfreeze, a small lr) is behind at the first
rung whatever it reaches later, so it is pruned before it can win. Here each stratum
(by default the trial's ``strategy``) keeps its own rungs: a trial is compared only
with trials of its own kind, and the best of each kind goes on to the later rungs,
where the final values decide. And a rung decides only once it holds ``min_peers``
other values of the stratum: with 8-20 trials the first arrivals are not pruned
against one lucky peer (plain ASHA prunes the second trial at a rung whenever it is
behind the first).

    rule = Halving(grace_period=1, reduction_factor=2, max_t=6, mode="max", min_peers=2)
    rule.decide("trial-3", "lora", evals=2, value=0.61)    # -> CONTINUE or STOP

``Halving`` is the rule, free of Tune (tests/unit/test_schedulers.py drives it with
scripted learning curves); ``StratifiedASHA`` is the Tune scheduler around it.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

CONTINUE, STOP = "CONTINUE", "STOP"
ALL = "*"  # the one stratum when trials are not stratified


def milestones(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The rungs (in evaluations) below max_t: grace, grace*rf, grace*rf^2, ..."""
    rungs, t = [], grace_period
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs


class Halving:
    """Asynchronous successive halving within strata.

    A trial reaching rung ``m`` continues when its value is at least as good as the
    (1 - 1/reduction_factor) quantile of the values its stratum's other trials had at
    ``m`` (ASHA's rule), or when fewer than ``min_peers`` of them got there yet."""

    def __init__(
        self,
        *,
        grace_period: int,
        reduction_factor: int,
        max_t: int,
        mode: str,
        min_peers: int,
    ) -> None:
        self.rungs = milestones(grace_period, reduction_factor, max_t)
        self.rf, self.sign, self.min_peers = reduction_factor, 1 if mode == "max" else -1, min_peers
        # stratum -> rung -> trial -> value (signed: larger is better)
        self.recorded: dict[str, dict[int, dict[str, float]]] = {}

    def decide(self, trial: str, stratum: str, *, evals: int, value: float) -> str:
        decision = CONTINUE
        for rung in self.rungs:
            if evals < rung:
                break
            seen = self.recorded.setdefault(stratum, {}).setdefault(rung, {})
            if trial in seen:
                continue
            peers = list(seen.values())
            seen[trial] = self.sign * value
            if peers and len(peers) >= self.min_peers:
                cutoff = float(np.percentile(peers, (1 - 1 / self.rf) * 100))
                if self.sign * value < cutoff:
                    decision = STOP
        return decision

    def reached(self) -> dict[str, dict[int, int]]:
        """How many trials of each stratum reached each rung."""
        return {s: {r: len(v) for r, v in rungs.items()} for s, rungs in self.recorded.items()}


class StratifiedASHA(FIFOScheduler):  # type: ignore[misc]
    """The Tune scheduler: ``Halving`` over each trial's stratum, read from the trial's
    sampled params (``stratify_by``; None: one stratum, i.e. ASHA with ``min_peers``)."""

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        time_attr: str,
        grace_period: int,
        reduction_factor: int,
        max_t: int,
        min_peers: int,
        stratify_by: str | None,
    ) -> None:
        super().__init__()
        self._metric, self.time_attr, self.stratify_by = metric, time_attr, stratify_by
        self.rule = Halving(
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            max_t=max_t,
            mode=mode,
            min_peers=min_peers,
        )

    def stratum(self, config: dict[str, Any]) -> str:
        if self.stratify_by is None:
            return ALL
        return str(config.get("params", {}).get(self.stratify_by, ALL))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("final") or self._metric not in result or self.time_attr not in result:
            return TrialScheduler.CONTINUE
        decision = self.rule.decide(
            trial.trial_id,
            self.stratum(trial.config),
            evals=int(result[self.time_attr]),
            value=float(result[self._metric]),
        )
        return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return (
            f"StratifiedASHA(by={self.stratify_by}, rungs={self.rule.rungs}): {self.rule.reached()}"
        )


class _Past:
    """A trial of an earlier driver, as a scheduler's bookkeeping sees one."""

    def __init__(self, trial_id: str, params: dict[str, Any]) -> None:
        self.trial_id, self.config = trial_id, {"params": params}


def replay(
    scheduler: Any, history: list[tuple[str, dict[str, Any], list[tuple[int, float]]]]
) -> int:
    """Feed the trials an earlier sweep driver ran (``jobs.study.finished_curves``) into
    a fresh scheduler's rungs, as they reported, so a rerun's pruning compares against
    every trial and not only its own. Plain ASHA/HyperBand: each past trial joins the
    bracket Ray would have drawn for it (drawn again, seeded by its key); stratified:
    its stratum. Returns how many trials were replayed."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    if isinstance(scheduler, StratifiedASHA):
        for key, params, points in history:
            for evals, value in points:
                scheduler.rule.decide(
                    key, scheduler.stratum({"params": params}), evals=evals, value=value
                )
        return len(history)
    if isinstance(scheduler, AsyncHyperBandScheduler):
        brackets = scheduler._brackets
        sizes = np.array([len(b._rungs) for b in brackets])
        probs = np.e ** (sizes - sizes.max())
        probs = probs / probs.sum()
        for key, params, points in history:
            draw = np.random.default_rng(zlib.crc32(key.encode()))
            bracket = brackets[int(draw.choice(len(brackets), p=probs))]
            past: Any = _Past(key, params)  # (a bracket reads only trial_id)
            sign = float(scheduler._metric_op or 1.0)
            for evals, value in points:
                bracket.on_result(past, evals, sign * value)
        return len(history)
    return 0
