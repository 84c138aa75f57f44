"""Scripted sweep trials: the sweep's searcher, scheduler, budget, study and resumption
on real Ray Tune and real Optuna storage, with learning curves computed from the
trial's parameters instead of trained (a trial takes about a second, not 20-30 s).

    python -m tests.integration.scripted [graft sweep overrides]    # a scripted driver

A trial's curve: eval_loss = (1 + |log10(lr / 1e-2)|) * (1 + 3 / evals), so trials
nearer lr=1e-2 are better at every evaluation; strategy=lora is a slow starter,
(1 + |log10(lr / 1e-2)|) * (0.5 + 5 / evals^2): behind every other strategy at the
first evaluation, ahead of all of them from the second. Each evaluation writes a checkpoint
marker under the trial's run directory and, on a rerun in the same directory (a
re-queued trial), the trial resumes after its last one and logs a "resume" event, as a
fine-tuning run does.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle

from conf.schema import FinetuneConfig, ParamSpec
from jobs import runlog
from jobs import space as space_lib

# Ray workers unpickle the trial function; this module is not on their import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Seconds an evaluation takes, per training step between evaluations: a 12-step trial
# evaluated every 4 steps takes 3 s (long enough for a second driver, or a kill, to
# find it running).
SECONDS_PER_STEP = 0.25


def curve(lr: float, evals: int, strategy: str = "full") -> float:
    scale = 1 + abs(math.log10(lr / 1e-2))
    if strategy == "lora":
        return scale * (0.5 + 5 / evals**2)
    return scale * (1 + 3 / evals)


def trial(config: dict[str, Any], *, base: FinetuneConfig, space: dict[str, ParamSpec]) -> None:
    from ray import tune

    cfg = space_lib.apply(base, space, config["params"])
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    log = runlog.RunLog(run_dir, enabled=True)
    every, evals = cfg.train.eval_every, space_lib.evaluations(cfg)
    done = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    start = max(done, default=0) // every
    if start:
        log.log({"event": "resume", "step": start * every})
    else:
        log.reset()
        log.log({"event": "start", "step": 0, "trainable_params": 1000})
    lr = float(cfg.train.lr)
    for e in range(start + 1, evals + 1):
        time.sleep(SECONDS_PER_STEP * every)
        value = curve(lr, e, cfg.strategy.name)
        marker = run_dir / "checkpoints" / f"step_{e * every:08d}"
        marker.mkdir(parents=True, exist_ok=True)
        (marker / "COMMITTED.rank0").touch()
        log.log({"step": e * every, "eval_loss": value})
        tune.report({"evals": e, "eval_loss": value, "step": e * every})
    end = {
        "eval_loss": curve(lr, evals, cfg.strategy.name),
        "trainable_params": 1000,
        "train_time_s": 0.0,
    }
    log.log({"event": "end", "step": evals * every, **end})
    log.close()
    tune.report({**end, "evals": evals, "step": evals * every, "final": 1})


def main() -> None:
    from jobs.config import compose
    from jobs.sweep import run

    summary = run(compose(sys.argv[1:], config_name="sweep"), trial=trial)
    print(json.dumps({"sweep_dir": str(summary.sweep_dir), "best": summary.best}))


if __name__ == "__main__":
    main()
