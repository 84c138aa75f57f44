"""Zero- and few-shot baselines in a real sweep summary, on real weights and real data:
WordNet noun glosses by supersense (10 classes, Debian's wordnet-base).

- SmolLM2-135M-Instruct (LLaMA architecture): a LoRA sweep (sweep=lora) with a
  classification head, beside the model with no training at all: calibrated label
  likelihood after the prompt (zero-shot) and after one solved gloss per label (few-shot).
- MiniLM-L6 (BERT encoder): the transfer sweep, beside embedding similarity to the
  label words (zero-shot) and to class centroids of 8 glosses per label (few-shot).

Each sweep's summary (summary.json, the lines `graft sweep` prints) holds the baselines
and the fine-tuned best's gain over them, on validation and paired on the test split.

    python tests/benchmarks/bench_zeroshot.py        # make bench-zeroshot; ~15 min on 2 cores
    -> runs/bench/zeroshot.json, runs/bench/zeroshot.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from jobs import runlog
from jobs.config import compose
from jobs.sweep import describe_summary
from jobs.sweep import run as sweep

DATA = ["data=wordnet_supersense", "data.max_examples=1200", "data.test_fraction=0.2"]

SWEEPS: dict[str, tuple[list[str], str]] = {
    "smollm2": (
        [
            "model=smollm2_135m",
            "model.task=sequence_classification",
            "strategy=lora",
            "sweep=lora",
            "sweep.num_trials=2",
            "sweep.scheduler=none",
            "sweep.enqueue=[{lora_rank:16,lora_alpha:32,lr:1e-3,adapter_blocks:30},"
            "{lora_rank:8,lora_alpha:16,lr:3e-4,adapter_blocks:30}]",
            "train.max_steps=60",
            "train.micro_batch_size=8",
            "train.eval_every=30",
            "train.checkpoint_every=30",
            "train.warmup_steps=6",
        ],
        "SmolLM2-135M + LoRA (classification head), 2 trials of 60 steps",
    ),
    "minilm": (
        [
            "model=minilm",
            "sweep.num_trials=4",
            "eval.shots=8",
            "train.max_steps=60",
            "train.micro_batch_size=16",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "train.warmup_steps=6",
        ],
        "MiniLM-L6, transfer sweep, 4 trials of 60 steps",
    ),
}


def run_one(name: str, out: Path) -> dict[str, Any]:
    overrides, title = SWEEPS[name]
    shutil.rmtree(out / name, ignore_errors=True)
    started = time.time()
    result = sweep(
        compose(
            DATA
            + overrides
            + [
                "sweep.baseline=[zero_shot,few_shot]",
                "sweep.max_concurrent=1",
                "scaling=local",
                "run.export=false",
                f"run.output_dir={out}",
                f"run.name={name}",
            ],
            config_name="sweep",
        ),
        show_progress=True,
    )
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    untrained = {
        kind: next(
            r
            for r in reversed(runlog.read(result.sweep_dir / "baselines" / kind))
            if r.get("event") == "end"
        )
        for kind in ("zero_shot", "few_shot")
    }
    return {
        "title": title,
        "seconds": time.time() - started,
        "summary": summary,
        "lines": describe_summary(summary),
        "untrained": untrained,
    }


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| model | what | eval accuracy | test accuracy | test macro-F1 | examples/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        best = r["summary"]["best"] or {}
        test = best.get("test", {})
        rows.append(
            f"| {name} | best fine-tuned trial | {best.get('values', [float('nan')])[0]:.3f} | "
            f"{test.get('test_accuracy', float('nan')):.3f} | "
            f"{test.get('test_macro_f1', float('nan')):.3f} | |"
        )
        for kind, end in r["untrained"].items():
            rows.append(
                f"| {name} | {kind} (no training) | {end['eval_accuracy']:.3f} | "
                f"{end.get('test_accuracy', float('nan')):.3f} | "
                f"{end.get('test_macro_f1', float('nan')):.3f} | {end['examples_per_s']:.1f} |"
            )
    text = ["# Zero- and few-shot baselines in a real sweep summary", "", *rows, ""]
    for name, r in results.items():
        text += [f"## {name}: {r['title']} ({r['seconds'] / 60:.1f} min)", ""]
        text += [f"    graft: {line}" for line in r["lines"]] + [""]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SWEEPS), action="append")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    work = args.out / "zeroshot_runs"
    results = {name: run_one(name, work) for name in args.only or list(SWEEPS)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zeroshot.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "zeroshot.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
