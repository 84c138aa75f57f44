"""How much of task A does fine-tuning on task B forget, and what keeps it? MiniLM.

    python tests/benchmarks/bench_forgetting.py [--steps-a 80] [--steps-b 60]
    (or: make bench-forgetting)

Sequential tasks on one head (stdlib areas; jobs/data/stdlib_docs.py), from two
registers of the standard library's docstrings: A = class and method docstrings of all
8 areas, B = function docstrings of only the 4 areas with the most of them (the
class-incremental setting, where plain fine-tuning forgets: a head trained on B alone
stops predicting the other 4 areas). MiniLM is fine-tuned on A (lr 1e-4); from A's
export, with A's label set, each row then fine-tunes on B for --steps-b steps at lr
3e-4 with one way of keeping A:
    plain          nothing
    l2sp           L2-SP towards A's weights (weight 1)
    ewc            EWC, Fisher from A's training data (weight 1, mean-normalised)
    freeze_depth   only the top 2 blocks and the head train
Every row scores A's held-out test examples before and after (the forgetting probe,
eval.source_path: forgotten = accuracy before - after) and B's held-out test split.
Writes runs/bench/forgetting.json and forgetting.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs.data.stdlib_docs import examples  # noqa: E402
from tests.benchmarks.common import fresh_run, metrics_of, one_eval_schedule  # noqa: E402


def write_tasks(out: Path, seed: int = 0, b_areas: int = 4) -> dict[str, Path]:
    """A's train and test files, and B's (all labelled); B keeps the ``b_areas`` areas
    with the most function docstrings."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, kind in (("a", "class"), ("b", "function")):
        rows = examples(kind=kind)
        if name == "b":
            keep = [label for label, _ in Counter(r["label"] for r in rows).most_common(b_areas)]
            rows = [r for r in rows if r["label"] in keep]
        random.Random(seed).shuffle(rows)
        cut = len(rows) // 5
        for split, part in (("test", rows[:cut]), ("train", rows[cut:])):
            path = out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
            paths[f"{name}_{split}"] = path
    return paths


def run_one(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    summary, wall = fresh_run(name, overrides, out)
    keys = ("test_accuracy", "source_accuracy_before", "source_accuracy", "forgotten")
    return metrics_of(summary, wall, keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-a", type=int, default=80)
    parser.add_argument("--steps-b", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    work = args.out / "forgetting"
    paths = write_tasks(work / "data")
    common = ["data=jsonl", "data.eval_fraction=0.15", "data.max_length=48"]
    task_a = run_one(
        "task-a",
        [
            "model=minilm",
            *common,
            f"data.path={paths['a_train']}",
            f"data.test_path={paths['a_test']}",
            "train.lr=1e-4",
            *one_eval_schedule(args.steps_a, 16),
        ],
        work,
    )
    labels = json.loads((Path(task_a["run_dir"]) / "export" / "labels.json").read_text())
    on_b = [
        "model=hf",
        f"model.path={Path(task_a['run_dir']) / 'export'}",
        "model.task=sequence_classification",
        *common,
        f"data.path={paths['b_train']}",
        f"data.test_path={paths['b_test']}",
        f"data.labels=[{','.join(labels)}]",  # A's head, in A's order
        f"eval.source_path={paths['a_test']}",
        "run.export=false",
        "train.lr=3e-4",
        *one_eval_schedule(args.steps_b, 16),
    ]
    ewc = f"objectives=[{{name:ewc,weight:1.0,args:{{source_path:{paths['a_train']}}}}}]"
    rows = {
        "plain": run_one("b-plain", on_b, work),
        "l2sp (1.0)": run_one("b-l2sp", on_b + ["objectives=[{name:l2sp,weight:1.0}]"], work),
        "ewc (1.0)": run_one("b-ewc", on_b + [ewc], work),
        "freeze_depth (top 2)": run_one(
            "b-freeze", on_b + ["strategy=freeze_depth", "strategy.num_trainable_blocks=2"], work
        ),
    }
    result = {
        "steps_a": args.steps_a,
        "steps_b": args.steps_b,
        "task_a_test_accuracy": task_a["test_accuracy"],
        "rows": rows,
        "measured": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forgetting.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Forgetting, MiniLM: A = stdlib class/method docstrings ({args.steps_a} steps, "
        f"test acc {task_a['test_accuracy']:.3f}), then B = function docstrings "
        f"({args.steps_b} steps, lr 3e-4) of 4 of the 8 areas, on A's head; ZeRO-2, 2 workers",
        "",
        "| on B with | B test acc | A acc before | A acc after | forgotten | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['test_accuracy']:.3f} | {r['source_accuracy_before']:.3f} | "
            f"{r['source_accuracy']:.3f} | {r['forgotten']:+.3f} | {r['wall_s']:.0f} |"
        )
    (args.out / "forgetting.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
