"""The sweep's pruning rule (jobs/schedulers.py) on scripted learning curves."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from jobs.schedulers import ALL, CONTINUE, STOP, Halving, milestones

Curve = Callable[[int], float]
EVALS = 8


def _play(
    rule: Halving, trials: list[tuple[str, Curve]], *, stratified: bool = True
) -> dict[int, int]:
    """Trials one after another (a sweep with max_concurrent=1), each evaluated until
    the rule stops it or its last evaluation: {trial index: evaluations it reached}."""
    reached = {}
    for i, (stratum, curve) in enumerate(trials):
        for e in range(1, EVALS + 1):
            reached[i] = e
            key = stratum if stratified else ALL
            if rule.decide(str(i), key, evals=e, value=curve(e)) == STOP:
                break
    return reached


def _rule(min_peers: int) -> Halving:
    return Halving(grace_period=1, reduction_factor=2, max_t=EVALS, mode="max", min_peers=min_peers)


def _fast(level: float) -> Curve:  # learns at once, then stays flat
    return lambda e: level - 0.1 / e


def _slow(level: float) -> Curve:  # behind for the first evaluations, best at the end
    return lambda e: level * e / EVALS


def test_milestones() -> None:
    assert milestones(1, 2, 8) == [1, 2, 4]
    assert milestones(1, 3, 9) == [1, 3]
    assert milestones(2, 2, 2) == []


def test_a_slow_starter_that_wins_survives_only_when_stratified() -> None:
    # Alternating fast (freeze_depth-like, plateau at 0.75) and slow (LoRA-like, 0.86 at
    # the end but behind until the 7th evaluation) strategies.
    trials = [
        (kind, _fast(0.75 + 0.01 * i) if kind == "fast" else _slow(0.86 + 0.01 * i))
        for i, kind in enumerate(["fast", "slow"] * 4)
    ]
    finals = {i: curve(EVALS) for i, (_, curve) in enumerate(trials)}

    plain = _play(_rule(min_peers=0), trials, stratified=False)  # Ray's ASHA
    complete = [i for i, e in plain.items() if e == EVALS]
    assert all(trials[i][0] == "fast" for i in complete), "ASHA kept a slow starter"
    assert max(finals[i] for i in complete) < 0.8  # the winner was pruned

    stratified = _play(_rule(min_peers=2), trials)
    complete = [i for i, e in stratified.items() if e == EVALS]
    best = max(complete, key=finals.__getitem__)
    assert trials[best][0] == "slow" and finals[best] >= 0.86
    assert {trials[i][0] for i in complete} == {"fast", "slow"}  # the best of each goes on


def test_eight_trials_do_not_leave_one_complete() -> None:
    # The first trial is the best at every evaluation (the case that left one trial
    # complete with plain ASHA).
    trials = [(ALL, _fast(0.9 - 0.03 * i)) for i in range(8)]
    plain = _play(_rule(min_peers=0), trials)
    assert [i for i, e in plain.items() if e == EVALS] == [0]
    sound = _play(_rule(min_peers=2), trials)
    complete = [i for i, e in sound.items() if e == EVALS]
    assert len(complete) >= 2 and complete[:2] == [0, 1]
    assert len(complete) < 8  # it still prunes once a rung has peers
    assert sound[7] < EVALS


def test_no_decision_before_min_peers() -> None:
    rule = _rule(min_peers=2)
    assert rule.decide("a", ALL, evals=1, value=0.9) == CONTINUE
    assert rule.decide("b", ALL, evals=1, value=0.1) == CONTINUE  # one peer only
    assert rule.decide("c", ALL, evals=1, value=0.2) == STOP  # two peers, below their median
    assert rule.decide("d", "other", evals=1, value=0.0) == CONTINUE  # its own stratum
    assert rule.reached() == {ALL: {1: 3}, "other": {1: 1}}


def test_min_mode_prunes_the_higher_loss() -> None:
    rule = Halving(grace_period=1, reduction_factor=2, max_t=4, mode="min", min_peers=1)
    assert rule.decide("a", ALL, evals=1, value=1.0) == CONTINUE
    assert rule.decide("b", ALL, evals=1, value=2.0) == STOP
    assert rule.decide("c", ALL, evals=1, value=0.5) == CONTINUE


@pytest.mark.parametrize("seed", range(5))
def test_one_stratum_without_min_peers_decides_as_ray_asha(seed: int) -> None:
    """Two trials at a time, interleaved at random: the same decisions as Ray Tune's
    ASHA bracket (min_peers=0, one stratum) before the last evaluation. (Ray's bracket
    also has a rung at max_t itself, where it can stop a trial that trained in full;
    ours has none: a trial's last evaluation ends it anyway.)"""

    class _T:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    rng = random.Random(seed)
    curves = {str(i): [rng.random() for _ in range(EVALS)] for i in range(12)}
    ours = _rule(min_peers=0)
    ray = _Bracket(min_t=1, max_t=EVALS, reduction_factor=2, s=0, stop_last_trials=False)
    waiting, running, at = list(curves), [], dict.fromkeys(curves, 0)
    while waiting or running:
        while waiting and len(running) < 2:
            running.append(waiting.pop(0))
        trial = rng.choice(running)
        at[trial] += 1
        value = curves[trial][at[trial] - 1]
        mine = ours.decide(trial, ALL, evals=at[trial], value=value)
        theirs = ray.on_result(_T(trial), at[trial], value)
        if at[trial] < EVALS:
            assert mine == theirs, (trial, at[trial])
        else:
            assert mine == CONTINUE
        if mine == STOP or at[trial] == EVALS:
            running.remove(trial)


# --------------------------------------------------------------------------- a rerun
class _Trial:
    """What Tune hands a scheduler about a trial: its id and config."""

    def __init__(self, trial_id: str, params: dict[str, object]) -> None:
        self.trial_id, self.config = trial_id, {"params": params}


def _ended_study() -> object:
    """A real Optuna study an earlier driver left: three trials that reached rung 1
    (eval 1) with good values, one failed and being retried (waiting: it will report
    again, so it must not be replayed), one still running."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(direction="minimize")
    dist = {"strategy": CategoricalDistribution(["lora", "full"])}
    for i, (state, values) in enumerate(
        [
            (TrialState.COMPLETE, {1: 0.30, 2: 0.25, 4: 0.20}),
            (TrialState.PRUNED, {1: 0.40}),
            (TrialState.COMPLETE, {1: 0.35, 2: 0.30, 4: 0.28}),
            (TrialState.FAIL, {1: 0.10}),  # retried below
            (TrialState.RUNNING, {1: 0.12}),
        ]
    ):
        study.add_trial(
            create_trial(
                state=state,
                value=values[max(values)] if state == TrialState.COMPLETE else None,
                params={"strategy": "lora" if i % 2 == 0 else "full"},
                distributions=dist,
                intermediate_values=values,
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            params={"strategy": "full"},
            distributions=dist,
            system_attrs={"retry_history": [3]},
        )
    )
    return study


def test_a_rerun_replays_the_ended_trials_into_the_rungs() -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    from jobs.schedulers import StratifiedASHA, replay
    from jobs.study import finished_curves

    history = finished_curves(_ended_study())
    assert [key for key, _, _ in history] == ["study-0", "study-1", "study-2"]
    assert history[0][2] == [(1, 0.30), (2, 0.25), (4, 0.20)]

    def asha() -> AsyncHyperBandScheduler:
        return AsyncHyperBandScheduler(
            time_attr="evals", metric="eval_loss", mode="min", grace_period=1,
            reduction_factor=2, max_t=8, brackets=1, stop_last_trials=False,
        )  # fmt: skip

    bad = {"evals": 1, "eval_loss": 0.50}
    fresh, rerun = asha(), asha()
    assert replay(rerun, history) == 3
    for scheduler in (fresh, rerun):
        scheduler.on_trial_add(None, _Trial("new", {"strategy": "lora"}))
    # a fresh scheduler has no peers at rung 1 and lets the worst trial go on
    assert fresh.on_trial_result(None, _Trial("new", {}), bad) == TrialScheduler.CONTINUE
    assert rerun.on_trial_result(None, _Trial("new", {}), bad) == TrialScheduler.STOP
    # a value among the best half of the replayed ones continues
    rerun.on_trial_add(None, _Trial("good", {}))
    good = {"evals": 1, "eval_loss": 0.31}
    assert rerun.on_trial_result(None, _Trial("good", {}), good) == TrialScheduler.CONTINUE

    stratified = StratifiedASHA(
        metric="eval_loss", mode="min", time_attr="evals", grace_period=1,
        reduction_factor=2, max_t=8, min_peers=2, stratify_by="strategy",
    )  # fmt: skip
    replay(stratified, history)
    assert stratified.rule.reached() == {"lora": {1: 2, 2: 2, 4: 2}, "full": {1: 1}}
    # 'lora' has two replayed peers at rung 1 (0.30, 0.35): 0.50 is pruned there
    assert stratified.on_trial_result(None, _Trial("x", {"strategy": "lora"}), bad) == "STOP"
    # 'full' has one (min_peers=2): no decision yet
    assert stratified.on_trial_result(None, _Trial("y", {"strategy": "full"}), bad) == "CONTINUE"
