"""Pruning efficiency of `graft sweep`: the same trials under Ray's ASHA, the stratified
rule (graft's default) and no pruning, and what one trial's start-up costs.

    python tests/benchmarks/bench_sweep_pruning.py [--trials 8] [--steps 30] [--evals 3]

A small real sweep: MiniLM (real pretrained weights) on the stdlib docstring task, the
`transfer` space. The trial parameter sets are drawn once (seeded random sampling from
the space) and enqueued, in the same order, into three studies: ASHA (every trial
against all; grace 1 evaluation, reduction factor 2), stratified (rungs per strategy,
min 2 peers) and no scheduler. Reported for each: training steps used by all trials
(a pruned trial counts the steps it trained; resumes do not occur here), wall time,
the best eval accuracy found and by which trial, and each trial's start-up: from the
searcher's ask (Optuna's trial start) to its engine being ready to train (the start
record in its metrics.jsonl), i.e. Tune's trial actor, the hand-over to a pool gang,
data, model and DeepSpeed set-up. Wall time is given twice: the whole `graft sweep`
(cluster connection, the pool's gangs starting once, the trials, shutdown) and the
trials' span (the first trial's start to the last one's end), which is what a
scheduler can shorten. An untimed 2-trial sweep runs first, so no variant pays for
cold caches (the first process to import torch, transformers and DeepSpeed on this
machine is several times slower than the next).
Writes runs/bench/sweep_pruning.json and sweep_pruning.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

import optuna  # noqa: E402

from jobs import runlog  # noqa: E402
from jobs import space as space_lib  # noqa: E402
from jobs.config import compose  # noqa: E402
from jobs.sweep import check  # noqa: E402
from jobs.sweep import run as sweep  # noqa: E402


def _points(overrides: list[str], n: int, seed: int) -> list[dict[str, object]]:
    cfg = compose(overrides, config_name="sweep")
    space, _ = check(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append(space_lib.sample(trial, space))
        study.tell(trial, 0.0)
    return points


def _hydra_list(points: list[dict[str, object]]) -> str:
    def value(v: object) -> str:
        return f"{v!r}" if isinstance(v, float) else str(v)

    return (
        "["
        + ",".join("{" + ",".join(f"{k}:{value(v)}" for k, v in p.items()) + "}" for p in points)
        + "]"
    )


def _measure(overrides: list[str], name: str) -> dict[str, object]:
    started = time.time()
    result = sweep(
        compose(overrides + [f"run.name={name}"], config_name="sweep"),
        show_progress=True,
        report=False,
    )
    elapsed = time.time() - started
    meta = json.loads((result.sweep_dir / "sweep.json").read_text())
    study = optuna.load_study(study_name=meta["study"], storage=meta["storage"])
    steps, states, startups = 0, {}, []
    for t in study.get_trials():
        if "run_dir" not in t.user_attrs:  # enqueued, never started (over num_trials)
            continue
        records = runlog.read(Path(t.user_attrs["run_dir"]))
        steps += max((r.get("step", 0) for r in records), default=0)
        states[t.state.name] = states.get(t.state.name, 0) + 1
        start = next((r for r in records if r.get("event") == "start"), None)
        if start is not None and t.datetime_start is not None:
            startups.append(start["time"] - t.datetime_start.timestamp())
    best = study.best_trial
    span = max(t.datetime_complete.timestamp() for t in study.trials if t.datetime_complete) - min(
        t.datetime_start.timestamp() for t in study.trials if t.datetime_start
    )
    return {
        "trials": len(study.trials),
        "states": states,
        "train_steps": steps,
        "wall_s": round(elapsed, 1),
        "trials_wall_s": round(span, 1),
        "best_eval_accuracy": best.value,
        "best_trial": best.number,
        "best_params": best.params,
        "startup_s": [round(x, 2) for x in startups],
        "startup_median_s": round(statistics.median(startups), 2) if startups else None,
        "startup_max_s": round(max(startups), 2) if startups else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--evals", type=int, default=3, help="evaluations per full trial (rungs)")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument(
        "--schedulers",
        nargs="+",
        choices=["asha", "stratified"],
        default=["asha", "stratified"],
        help="the pruning variants to run (no pruning, the reference, always runs)",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = [
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps // args.evals}",
        f"train.checkpoint_every={args.steps // args.evals}",
        f"sweep.num_trials={args.trials}",
        f"sweep.max_concurrent={args.concurrent}",
        "sweep.baseline=none",
        # (the best trial's retrain is the same full run under every scheduler: left out)
        "sweep.retrain_best=false",
        f"run.output_dir={out / 'sweeps'}",
    ]
    points = _points(base, args.trials, seed=7)
    base.append(f"sweep.enqueue={_hydra_list(points)}")
    import ray

    # 2 trials of one evaluation each (no retrain): imports, data and weights warm.
    warm = [o for o in base if not o.startswith(("sweep.num_trials", "sweep.enqueue"))]
    _measure(
        warm
        + [
            "sweep.num_trials=2",
            "sweep.enqueue=[]",
            "sweep.max_t=1",
            "sweep.scheduler=none",
        ],
        f"bench-pruning-warmup-{int(time.time())}",
    )
    results = {}
    variants = {"asha": "asha", "stratified": "stratified", "no pruning": "none"}
    for label, scheduler in variants.items():
        if scheduler != "none" and scheduler not in args.schedulers:
            continue
        results[label] = _measure(
            base + [f"sweep.scheduler={scheduler}"], f"bench-pruning-{scheduler}-{int(time.time())}"
        )
    ray.shutdown()
    fifo = results["no pruning"]

    def saved(label: str, key: str) -> float:
        return round(1 - results[label][key] / fifo[key], 3)  # type: ignore[operator]

    savings = {
        label: {key: saved(label, key) for key in ("train_steps", "wall_s", "trials_wall_s")}
        for label in results
        if label != "no pruning"
    }
    record = {
        "setup": f"MiniLM on stdlib_docs, transfer space, {args.trials} enqueued trials x {args.steps} steps, "
        f"eval every {args.steps // args.evals}, {args.concurrent} trials at once, 1 worker each, ZeRO-2, 2 CPU cores",
        "points": points,
        "results": results,
        "saved_vs_no_pruning": savings,
        "steps_saved_fraction": savings.get("asha", {}).get("train_steps"),
        "wall_saved_fraction": savings.get("asha", {}).get("wall_s"),
    }
    (out / "sweep_pruning.json").write_text(json.dumps(record, indent=2, default=str))
    lines = [
        "| sweep | trials (complete/pruned) | training steps | wall s (sweep) | wall s (trials) | best eval_accuracy (trial) | trial start-up s (median / max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        states = r["states"]
        lines.append(
            f"| {label} | {states.get('COMPLETE', 0)}/{states.get('PRUNED', 0)} | {r['train_steps']} | "  # type: ignore[union-attr]
            f"{r['wall_s']} | {r['trials_wall_s']} | {r['best_eval_accuracy']:.3f} ({r['best_trial']}) | "
            f"{r['startup_median_s']} / {r['startup_max_s']} |"
        )
    lines.append("")
    for label, s in savings.items():
        lines.append(
            f"{label} vs no pruning: {s['train_steps']:.0%} of the training steps saved, "
            f"{s['wall_s']:.0%} of the sweep's wall time, {s['trials_wall_s']:.0%} of the trials' span."
        )
    lines.append(f"\n{record['setup']}.")
    (out / "sweep_pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
