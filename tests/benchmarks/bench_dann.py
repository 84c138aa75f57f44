"""Does domain-adversarial training help on a real domain shift? MiniLM, offline.

    python tests/benchmarks/bench_dann.py [--steps 100] [--weights 0.1,0.5]
    (or: make bench-dann)

Two domains with the same 8 labels, both from the standard library's own docstrings
(jobs/data/stdlib_docs.py): the source is class and method docstrings ("Return the
socket's file descriptor."), labelled by the module's area; the target is function
docstrings of the same areas ("Open a connection to the host."), a different register.
The target's function docstrings are split in two halves: one, unlabelled, is DANN's
target stream; the other, labelled, is the test split (only reported, never used to
choose anything). Validation is a held-out part of the source.

Same budget for each row (2 DeepSpeed workers, ZeRO-2, full fine-tuning, lr 1e-4,
micro batch 16, --steps steps):
    source only   plain fine-tuning on the source
    dann w        + the DANN term at weight w (Ganin schedule, lambda up to 1)
Writes runs/bench/dann.json and dann.md; each DANN row says whether it beat the plain
row on the target, by how much.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs import runlog  # noqa: E402
from jobs.data.stdlib_docs import examples  # noqa: E402
from tests.benchmarks.common import fresh_run  # noqa: E402


def write_domains(out: Path, seed: int = 0) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    source = examples(kind="class")
    target = examples(kind="function")
    random.Random(seed).shuffle(target)
    half = len(target) // 2
    files = {
        "source": (source, True),
        "target": (target[:half], False),  # unlabelled: DANN's stream
        "target_test": (target[half:], True),
    }
    paths = {}
    for name, (rows, labelled) in files.items():
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            for r in rows:
                f.write(json.dumps(r if labelled else {"text": r["text"]}) + "\n")
        paths[name] = path
    return paths


def run_one(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    summary, wall = fresh_run(name, overrides, out)
    records = runlog.read(summary.run_dir)
    domain = [r["dann_domain_accuracy"] for r in records if "dann_domain_accuracy" in r]
    return {
        "source_eval_accuracy": summary.metrics.get("eval_accuracy"),
        "target_test_accuracy": summary.metrics.get("test_accuracy"),
        "target_test_macro_f1": summary.metrics.get("test_macro_f1"),
        "domain_accuracy_last": domain[-1] if domain else None,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--weights", default="0.1,0.5")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    work = args.out / "dann"
    paths = write_domains(work / "data")
    base = [
        "model=minilm",
        "data=jsonl",
        f"data.path={paths['source']}",
        f"data.test_path={paths['target_test']}",
        "data.eval_fraction=0.2",
        "data.max_length=48",
        "strategy=full",
        "deepspeed=zero2",
        "train.lr=1e-4",
        f"train.max_steps={args.steps}",
        "train.micro_batch_size=16",
        f"train.warmup_steps={args.steps // 10}",
        "train.schedule=linear",
        f"train.eval_every={max(args.steps // 2, 1)}",
        f"train.checkpoint_every={args.steps}",
        "train.log_every=10",
        "run.export=false",
    ]
    rows: dict[str, dict[str, Any]] = {"source only": run_one("plain", base, work)}
    for weight in [float(w) for w in args.weights.split(",")]:
        term = f"objectives=[{{name:dann,weight:{weight},args:{{target_path:{paths['target']}}}}}]"
        rows[f"dann {weight:g}"] = run_one(f"dann-{weight:g}", base + [term], work)
    plain = rows["source only"]["target_test_accuracy"]
    for row in rows.values():
        row["target_gain"] = row["target_test_accuracy"] - plain
    result = {
        "steps": args.steps,
        "source_examples": sum(1 for _ in paths["source"].open()),
        "target_unlabelled": sum(1 for _ in paths["target"].open()),
        "target_test": sum(1 for _ in paths["target_test"].open()),
        "rows": rows,
        "measured": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dann.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"DANN on stdlib docstrings: source = class/method docs ({result['source_examples']}), "
        f"target = function docs ({result['target_unlabelled']} unlabelled, "
        f"{result['target_test']} labelled test); MiniLM full, {args.steps} steps",
        "",
        "| run | source val acc | target test acc | target macro-F1 | vs plain | domain acc (last) | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        dom = r["domain_accuracy_last"]
        lines.append(
            f"| {name} | {r['source_eval_accuracy']:.3f} | {r['target_test_accuracy']:.3f} | "
            f"{r['target_test_macro_f1']:.3f} | {r['target_gain']:+.3f} | "
            f"{'-' if dom is None else f'{dom:.2f}'} | {r['wall_s']:.0f} |"
        )
    (args.out / "dann.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
