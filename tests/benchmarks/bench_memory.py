"""ZeRO memory per rank, and LoRA vs full fine-tuning, measured on a ~71M LLaMA.

    python tests/benchmarks/bench_memory.py [--steps 6]        # or: make bench

A LLaMA config of 71M parameters (hidden 768, 10 blocks, 12 heads, MLP 2048, byte
vocabulary), fp32, 2 ranks (DeepSpeed over gloo, one CPU core each), micro batch 4 x
128 tokens. Each configuration runs ``jobs.memprobe`` under torchrun: graft's model,
strategy, parameter groups and DeepSpeed config, on synthetic batches.

1. ZeRO 0/1/2/3, full fine-tuning: per-rank model-state memory (live tensor storage:
   parameters, gradients, optimizer states, DeepSpeed's partitions and buckets; the most
   seen inside backward, after it and after the step), its ratio to ZeRO-0, the paper's
   figure (Rajbhandari et al. 2020, written for fp32 training: 4P params + 4P grads + 8P
   Adam, with stage 1 partitioning the optimizer, 2 the gradients too, 3 everything)
   and `graft plan`'s estimate.
2. LoRA (r 16, q/k/v/o) vs full at ZeRO-2: tokens/s (all ranks, steady steps), model
   states + saved activations per rank, and peak RSS per rank.
Writes runs/bench/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs import plan  # noqa: E402
from jobs.config import compose  # noqa: E402

MODEL = [
    "model=tiny_llama",
    "model.arch.hidden_size=768",
    "model.arch.intermediate_size=2048",
    "model.arch.num_hidden_layers=10",
    "model.arch.num_attention_heads=12",
    "model.arch.num_key_value_heads=12",
    "data=jsonl",
    "data.path=unused.jsonl",
    "data.task=instruction",
    "data.max_length=128",
    "train.micro_batch_size=4",
]
WORLD = 2
MiB = 2**20


def probe(overrides: list[str], steps: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="graft-bench-")) / "probe.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            "-m",
            "jobs.memprobe",
            str(out),
            *overrides,
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", GRAFT_PROBE_STEPS=str(steps)),
        check=True,
        capture_output=True,
    )
    ranks = json.loads(out.read_text())["runs"][0]["ranks"]
    return {
        "model_states": max(r["model_states"] for r in ranks),
        "activations": max(r["activations"] for r in ranks),
        "tokens_per_s": ranks[0]["tokens_per_s"],
        "peak_rss": max(r["peak_rss"] for r in ranks),
    }


def paper(stage: int, params: int, world: int) -> int:
    """Per-rank model states of fp32 Adam training as the ZeRO paper partitions them."""
    p, g, o = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        o //= world
    if stage >= 2:
        g //= world
    if stage >= 3:
        p //= world
    return p + g + o


def teacher_memory(steps: int) -> dict[str, Any]:
    """Model states of a 5-block student with and without the 10-block teacher."""
    from jobs.models import build

    teacher_dir = Path(tempfile.mkdtemp(prefix="graft-teacher-"))
    teacher, tokenizer = build(compose(MODEL).model)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    del teacher
    student = [*MODEL, "model.arch.num_hidden_layers=5", "strategy=full"]
    term = f"objectives=[{{name:distill,args:{{teacher:{teacher_dir},alpha:0.5}}}}]"
    stages: dict[int, dict[str, Any]] = {}
    for stage in (2, 3):
        alone = [*student, f"deepspeed=zero{stage}"]
        both = [*alone, term]
        estimate = plan.estimate(compose(both), num_gpus=WORLD)
        row = {
            "student": probe(alone, steps)["model_states"],
            "with_teacher": probe(both, steps)["model_states"],
            "expected": 4 * teacher_params // (WORLD if stage == 3 else 1),
            "plan": estimate.memory.terms,
        }
        row["teacher"] = row["with_teacher"] - row["student"]
        stages[stage] = row
        print(f"bench: distill ZeRO-{stage}: {row}", flush=True)
    student_params = plan.estimate(compose([*student, "deepspeed=zero2"]), num_gpus=WORLD)
    return {
        "teacher_params": teacher_params,
        "student_params": student_params.counts.total,
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    zero: dict[int, dict[str, Any]] = {}
    for stage in (0, 1, 2, 3):
        overrides = [*MODEL, f"deepspeed=zero{stage}", "strategy=full"]
        estimate = plan.estimate(compose(overrides), num_gpus=WORLD)
        measured = probe(overrides, args.steps)
        zero[stage] = {
            **measured,
            "params": estimate.counts.total,
            "paper": paper(stage, estimate.counts.total, WORLD),
            "plan": estimate.memory.model_states + estimate.memory.buffers,
        }
        print(f"bench: ZeRO-{stage}: {zero[stage]}", flush=True)
    base = zero[0]["model_states"]
    for row in zero.values():
        row["vs_zero0"] = row["model_states"] / base
        row["vs_paper"] = row["model_states"] / row["paper"]

    lora_vs_full: dict[str, dict[str, Any]] = {}
    for name, strategy in (
        ("full", ["strategy=full"]),
        ("lora", ["strategy=lora", "strategy.lora.r=16", "strategy.lora.alpha=32"]),
    ):
        overrides = [*MODEL, "deepspeed=zero2", *strategy]
        estimate = plan.estimate(compose(overrides), num_gpus=WORLD)
        measured = probe(overrides, args.steps)
        lora_vs_full[name] = {
            **measured,
            "trainable_params": estimate.counts.trainable,
            "memory": measured["model_states"] + measured["activations"],
        }
        print(f"bench: {name}: {lora_vs_full[name]}", flush=True)

    distill = teacher_memory(args.steps)

    result = {
        "machine": "2 CPU cores, fp32, DeepSpeed over gloo",
        "world_size": WORLD,
        "model": MODEL,
        "zero": zero,
        "lora_vs_full": lora_vs_full,
        "distill": distill,
    }
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    params = zero[0]["params"]
    lines = [
        f"LLaMA {params / 1e6:.0f}M parameters, fp32, {WORLD} ranks, per-rank model states",
        "",
        "| ZeRO stage | measured (MiB) | vs ZeRO-0 | paper (MiB) | measured / paper | graft plan (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, row in zero.items():
        lines.append(
            f"| {stage} | {row['model_states'] / MiB:,.0f} | {row['vs_zero0']:.2f} | "
            f"{row['paper'] / MiB:,.0f} | {row['vs_paper']:.2f} | {row['plan'] / MiB:,.0f} |"
        )
    full, lora = lora_vs_full["full"], lora_vs_full["lora"]
    lines += [
        "",
        f"LoRA (r 16) vs full fine-tuning, ZeRO-2, micro batch 4 x 128 tokens, {WORLD} ranks",
        "",
        "| strategy | trainable params | tokens/s | model states + activations per rank (MiB) | peak RSS per rank (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in lora_vs_full.items():
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {row['tokens_per_s']:.0f} | "
            f"{row['memory'] / MiB:,.0f} | {row['peak_rss'] / MiB:,.0f} |"
        )
    lines.append(
        f"| lora / full | | {lora['tokens_per_s'] / full['tokens_per_s']:.2f} | "
        f"{lora['memory'] / full['memory']:.2f} | {lora['peak_rss'] / full['peak_rss']:.2f} |"
    )
    lines += [
        "",
        f"Distillation: a frozen {distill['teacher_params'] / 1e6:.0f}M teacher beside a "
        f"{distill['student_params'] / 1e6:.0f}M student, full fine-tuning, {WORLD} ranks, "
        "per-rank model states",
        "",
        "| ZeRO stage | student alone (MiB) | with teacher (MiB) | teacher's share (MiB) | "
        "4 B x teacher params (/ ranks at ZeRO-3) (MiB) | graft plan's teacher (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, row in distill["stages"].items():
        lines.append(
            f"| {stage} | {row['student'] / MiB:,.0f} | {row['with_teacher'] / MiB:,.0f} | "
            f"{row['teacher'] / MiB:,.0f} | {row['expected'] / MiB:,.0f} | "
            f"{row['plan'] / MiB:,.0f} |"
        )
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
