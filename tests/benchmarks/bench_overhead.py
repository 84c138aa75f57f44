"""Overhead of `graft finetune` over a hand-written DeepSpeed loop under torchrun.

    python tests/benchmarks/bench_overhead.py [--steps 60] [--stage 2] [--models tiny,minilm]
                                              [--repeats 3]

For each model, measured in one run: the same model, batches (micro batch 8, 2 workers),
ZeRO stage and DeepSpeed config for graft and for the minimal loop
(tests/benchmarks/minimal_ds_loop.py, unchanged). Models: a tiny LLaMA (hidden 256, 4
blocks; instruction data) and MiniLM-L6 (the real 22.7M-parameter BERT; sequence
classification). graft evaluates and checkpoints only at its last step, so the steady
window stops one log interval before it. Reported:
- steady-state steps/s (from step 10 to step steps-10, wall clock) and their ratio;
- the same against the minimal loop with its model in training mode
  (minimal_ds_loop_train_mode.py): the minimal loop trains the model in the eval mode
  ``from_pretrained`` leaves it in, so MiniLM's dropout (0.1) is off there and on in
  graft; the tiny LLaMA has no dropout;
- time from command start to the end of the first optimizer step, and where graft's
  went (the start record's ``startup`` timeline, jobs/timeline.py).
graft with its own embedded Ray, the plain loop and its training-mode variant run one
after the other ``--repeats`` times (each run is kept; the medians are reported: on 2 cores one run of the same code
moves by ±5%), then graft once more joining a `graft cluster up` cluster started
beforehand.
Writes runs/bench/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs import runlog  # noqa: E402
from jobs.config import compose  # noqa: E402
from jobs.engine import deepspeed_config  # noqa: E402
from jobs.models import hf_config, hidden_size  # noqa: E402
from tests.conftest import write_classification, write_instructions  # noqa: E402

TINY = [
    "model=tiny_llama",
    "model.arch.hidden_size=256",
    "model.arch.intermediate_size=688",
    "model.arch.num_attention_heads=8",
    "model.arch.num_key_value_heads=4",
]
MINIMAL = ROOT / "tests" / "benchmarks" / "minimal_ds_loop.py"
TRAIN_MODE = ROOT / "tests" / "benchmarks" / "minimal_ds_loop_train_mode.py"
MODELS = {
    "tiny": ("tiny LLaMA hidden 256, 4 blocks (instruction data)", TINY, "instruction"),
    "minilm": (
        "MiniLM-L6, 22.7M parameters (sequence classification)",
        ["model=minilm"],
        "classification",
    ),
}


def steady(steps: list[int], times: list[float], last: int) -> float:
    """Steps/s between step 10 and ``last`` (both logged)."""
    i, j = steps.index(10), steps.index(last)
    return (steps[j] - steps[i]) / (times[j] - times[i])


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    what, arch, task = MODELS[name]
    if task == "instruction":
        data_file = write_instructions(work / f"{name}.jsonl", n=2000)
    else:
        data_file = write_classification(work / f"{name}.jsonl", n=2000)
    overrides = arch + [
        "data=jsonl",
        f"data.task={task}",
        f"data.path={data_file}",
        "data.max_length=64",
        f"deepspeed=zero{args.stage}",
        "strategy=full",
        "scaling=local",
        f"train.max_steps={args.steps}",
        "train.micro_batch_size=8",
        "train.lr=1e-3" if task == "instruction" else "train.lr=5e-5",
        "train.warmup_steps=0",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=10",
        "train.eval_at_start=false",
        "run.export=false",
        f"run.output_dir={work}",
        f"run.name=graft-{name}",
    ]
    cfg = compose(overrides)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    last = args.steps - 10  # (the last step's record comes after the final evaluation)

    # 1. The hand-written loop's spec: same model, data, DeepSpeed config.
    spec = {
        "model": {k: v for k, v in vars(cfg.model).items()},
        "data": {k: v for k, v in vars(cfg.data).items()},
        "train": {k: v for k, v in vars(cfg.train).items() if k != "early_stopping"},
        "deepspeed": deepspeed_config(
            cfg.deepspeed,
            cfg.train,
            world_size=cfg.scaling.num_workers,
            hidden_size=hidden_size(hf_config(cfg.model)),
        ),
    }
    (work / f"spec-{name}.json").write_text(json.dumps(spec))

    # 2. graft finetune as a user runs it (its own embedded Ray) and the hand-written
    # loop under torchrun, one after the other, args.repeats times.
    grafts, plains, trains = [], [], []
    for i in range(args.repeats):
        run = f"graft-{name}-{i}"
        grafts.append(
            run_graft(
                [*overrides, f"run.name={run}", "cluster.reuse_local=false"], work / run, env, last
            )
        )
        plains.append(run_plain(work, f"{name}-{i}", work / f"spec-{name}.json", env, last))
        trains.append(
            run_plain(work, f"{name}-{i}-train", work / f"spec-{name}.json", env, last, TRAIN_MODE)
        )
    graft, plain, train_mode = summary(grafts), summary(plains), summary(trains)

    # 3. graft joining a `graft cluster up` cluster already running.
    home = work / f"home-{name}"
    joined_env = dict(env, GRAFT_HOME=str(home))
    cli = [sys.executable, "-m", "cluster.cli"]
    subprocess.run(
        [*cli, "cluster", "up", "--num-cpus", "2", "--workers", "0"],
        cwd=ROOT,
        env=joined_env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        joined = run_graft(
            [*overrides, f"run.name=graft-{name}-joined"],
            work / f"graft-{name}-joined",
            joined_env,
            last,
        )
    finally:
        subprocess.run([*cli, "cluster", "down"], cwd=ROOT, env=joined_env, check=True)

    return {
        "model": what,
        "graft": graft,
        "graft_joined_local_cluster": joined,
        "torchrun_deepspeed": plain,
        "torchrun_deepspeed_train_mode": train_mode,
        "steps_per_s_ratio": graft["steps_per_s"] / plain["steps_per_s"],
        "steps_per_s_ratio_per_pair": [
            round(g["steps_per_s"] / p["steps_per_s"], 3)
            for g, p in zip(grafts, plains, strict=True)
        ],
        "steps_per_s_ratio_vs_train_mode": graft["steps_per_s"] / train_mode["steps_per_s"],
        "steps_per_s_ratio_vs_train_mode_per_pair": [
            round(g["steps_per_s"] / t["steps_per_s"], 3)
            for g, t in zip(grafts, trains, strict=True)
        ],
    }


def run_plain(
    work: Path, tag: str, spec: Path, env: dict[str, str], last: int, loop: Path = MINIMAL
) -> dict:
    """The hand-written loop under torchrun, 2 processes (tests/benchmarks/minimal_ds_loop.py,
    or another ``loop`` script)."""
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(loop),
            str(work / f"plain-{tag}.json"),
            str(spec),
        ],
        cwd=ROOT,
        env=dict(env, OMP_NUM_THREADS="1"),
        check=True,
    )
    times = json.loads((work / f"plain-{tag}.json").read_text())["step_times"]
    return {
        "steps_per_s": steady(list(range(1, len(times) + 1)), times, last),
        "time_to_first_step_s": times[0] - t0,
    }


def summary(runs: list[dict]) -> dict:
    """The median of each measure over ``runs`` (which are kept, in order, under "runs");
    graft's start-up timeline is the one of its median run by first step."""
    out: dict = {
        key: statistics.median(r[key] for r in runs)
        for key in ("steps_per_s", "time_to_first_step_s")
    }
    out["runs"] = [{k: round(v, 3) for k, v in r.items() if k != "startup"} for r in runs]
    if "startup" in runs[0]:
        by_start = sorted(runs, key=lambda r: r["time_to_first_step_s"])
        out["startup"] = by_start[(len(by_start) - 1) // 2]["startup"]
    return out


def run_graft(overrides: list[str], run_dir: Path, env: dict[str, str], last: int) -> dict:
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "cluster.cli", "finetune", "-q", *overrides],
        cwd=ROOT,
        env=env,
        check=True,
    )
    log = runlog.read(run_dir)
    records = [r for r in log if "loss" in r]
    start = next(r for r in log if r.get("event") == "start")
    steps, times = [r["step"] for r in records], [r["time"] for r in records]
    return {
        "steps_per_s": steady(steps, times, last),
        "time_to_first_step_s": times[0] - t0,
        "startup": {**start.get("startup", {}), "first_step": round(times[0] - t0, 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--models", default="tiny,minilm")
    # Each side's runs vary by a few percent on a 2-core machine: medians of alternating runs.
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 (got {args.repeats})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    results = {name: measure(name, args, work) for name in args.models.split(",")}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "setup": {
            "workers": 2,
            "zero_stage": args.stage,
            "micro_batch": 8,
            "seq_len<=": 64,
            "steps": args.steps,
            "steady_window": f"step 10 to {args.steps - 10}",
            "repeats": f"{args.repeats} alternating runs of graft (embedded), the plain loop and its training-mode variant; medians",
        },
        "models": results,
    }
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    rows = []
    for r in results.values():
        g, j, p = r["graft"], r["graft_joined_local_cluster"], r["torchrun_deepspeed"]
        t = r["torchrun_deepspeed_train_mode"]
        vs_train = ", ".join(map(str, r["steps_per_s_ratio_vs_train_mode_per_pair"]))
        firsts = [run["time_to_first_step_s"] for run in g["runs"]]
        rows.append(
            f"| {r['model']} | {g['steps_per_s']:.2f} | {p['steps_per_s']:.2f} "
            f"| {r['steps_per_s_ratio']:.2f} ({', '.join(map(str, r['steps_per_s_ratio_per_pair']))}) "
            f"| {t['steps_per_s']:.2f} | {r['steps_per_s_ratio_vs_train_mode']:.2f} ({vs_train}) "
            f"| {g['time_to_first_step_s']:.1f} ({min(firsts):.1f}-{max(firsts):.1f}) "
            f"| {j['time_to_first_step_s']:.1f} ({j['steps_per_s']:.2f} steps/s) "
            f"| {p['time_to_first_step_s']:.1f} |"
        )
    table = (
        f"Medians of {args.repeats} alternating runs (per pair; range):\n\n"
        "| model | graft steps/s | plain steps/s | ratio (per pair) "
        "| plain, model.train(): steps/s | ratio to it (per pair) | graft first step (s) (range) "
        "| graft, `graft cluster up` running: first step (s) | plain first step (s) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    timeline = "\n".join(
        f"- {r['model']}, {how}: " + ", ".join(f"{k} {v}" for k, v in r[key]["startup"].items())
        for r in results.values()
        for how, key in (("embedded", "graft"), ("joined", "graft_joined_local_cluster"))
    )
    (out / "overhead.md").write_text(
        f"# Overhead ({result['machine']}, ZeRO-{args.stage}, 2 workers)\n\n{table}\n"
        f"graft's start-up, seconds from the command (jobs/timeline.py):\n\n{timeline}\n"
    )
    print(table)
    print(timeline)


if __name__ == "__main__":
    main()
