"""Overhead of `graft finetune` over a hand-written DeepSpeed loop under torchrun.

    python tests/benchmarks/bench_overhead.py [--steps 60] [--stage 2]     # or: make bench

Same tiny LLaMA (hidden 256, 4 blocks), same batches (micro batch 8, 2 workers), same
ZeRO stage, measured in one run. graft evaluates and checkpoints only at the end here,
so the steady-state numbers compare the training loops. Reported:
- steady-state steps/s (from step 10 to the last step, wall clock) and their ratio;
- time from command start to the end of the first optimizer step.
Writes runs/bench/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
from tests.conftest import write_instructions  # noqa: E402

ARCH = [
    "model=tiny_llama",
    "model.arch.hidden_size=256",
    "model.arch.intermediate_size=688",
    "model.arch.num_attention_heads=8",
    "model.arch.num_key_value_heads=4",
]


def steady_rate(steps: list[int], times: list[float], first: int = 10) -> float:
    """Optimizer steps per second between step ``first`` and the last step."""
    i = steps.index(first)
    return (steps[-1] - steps[i]) / (times[-1] - times[i])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    data_file = write_instructions(work / "instruct.jsonl", n=2000)
    overrides = ARCH + [
        "data=jsonl",
        "data.task=instruction",
        f"data.path={data_file}",
        "data.max_length=64",
        f"deepspeed=zero{args.stage}",
        "strategy=full",
        "scaling=local",
        f"train.max_steps={args.steps}",
        "train.micro_batch_size=8",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=10",
        "train.eval_at_start=false",
        "run.export=false",
        f"run.output_dir={work}",
        "run.name=graft",
    ]
    cfg = compose(overrides)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    # 1. graft finetune, as a user runs it.
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "cluster.cli", "finetune", "-q", *overrides],
        cwd=ROOT,
        env=env,
        check=True,
    )
    records = [r for r in runlog.read(work / "graft") if "loss" in r]
    graft_steps, graft_times = [r["step"] for r in records], [r["time"] for r in records]
    graft = {
        "steps_per_s": steady_rate(graft_steps, graft_times),
        "time_to_first_step_s": graft_times[0] - t0,
    }

    # 2. The hand-written loop under torchrun: same model, data, DeepSpeed config.
    spec = {
        "model": {k: v for k, v in vars(cfg.model).items()},
        "data": {k: v for k, v in vars(cfg.data).items()},
        "train": {k: v for k, v in vars(cfg.train).items() if k != "early_stopping"},
        "deepspeed": deepspeed_config(
            cfg.deepspeed,
            cfg.train,
            world_size=cfg.scaling.num_workers,
            hidden_size=cfg.model.arch["hidden_size"],
        ),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "benchmarks" / "minimal_ds_loop.py"),
            str(work / "plain.json"),
            str(work / "spec.json"),
        ],
        cwd=ROOT,
        env=dict(env, OMP_NUM_THREADS="1"),
        check=True,
    )
    plain_times = json.loads((work / "plain.json").read_text())["step_times"]
    plain_steps = list(range(1, len(plain_times) + 1))
    plain = {
        "steps_per_s": steady_rate(plain_steps, plain_times),
        "time_to_first_step_s": plain_times[0] - t0,
    }

    result = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "setup": {
            "model": "tiny LLaMA hidden 256, 4 blocks",
            "workers": 2,
            "zero_stage": args.stage,
            "micro_batch": 8,
            "seq_len<=": 64,
            "steps": args.steps,
        },
        "graft": graft,
        "torchrun_deepspeed": plain,
        "steps_per_s_ratio": graft["steps_per_s"] / plain["steps_per_s"],
    }
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    table = (
        "| | steady steps/s | time to first step (s) |\n|---|---|---|\n"
        f"| graft finetune (Ray Train + DeepSpeed) | {graft['steps_per_s']:.2f} | {graft['time_to_first_step_s']:.1f} |\n"
        f"| hand-written DeepSpeed loop (torchrun) | {plain['steps_per_s']:.2f} | {plain['time_to_first_step_s']:.1f} |\n"
        f"| ratio graft / plain | {result['steps_per_s_ratio']:.2f} | |\n"
    )
    (out / "overhead.md").write_text(
        f"# Overhead ({result['machine']}, ZeRO-{args.stage}, 2 workers)\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
