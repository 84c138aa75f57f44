"""Does distillation help a smaller student? Real weights, offline.

    python tests/benchmarks/bench_distill.py [--steps 80] [--lm-steps 30] [--skip-lm]
    (or: make bench-distill)

Classification (stdlib docstrings by area, 8 labels; jobs/data/stdlib_docs.py): the
teacher is MiniLM (6 blocks) fine-tuned here for --steps steps; the student is MiniLM
cut to its first 3 blocks (pretrained embeddings and blocks 0-2, the rest dropped: the
DistilBERT-style start). Both student rows train for the same --steps at the same lr
(--student-lr; the teacher's 1e-4 leaves a cut model with a new head near chance at
this budget), without and with the teacher (alpha 0.5, T 2), and each row reports the
held-out test split (20 %, never used to choose anything).

Causal LM (WordNet noun glosses as instructions, data=wordnet_instruct): the teacher is
SmolLM2-135M-Instruct (30 blocks) as it ships; the student is SmolLM2 cut to 6 blocks
(same tokenizer), trained in full for --lm-steps with and without the teacher's
token-level soft targets over the vocabulary; rows report the eval loss on responses.

2 DeepSpeed workers, ZeRO-2, on this machine's CPUs. Writes runs/bench/distill.json
and distill.md; each row says by how much the distilled student beat (or lost to) the
plain one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs.config import compose  # noqa: E402
from tests.benchmarks.common import fresh_run, metrics_of, one_eval_schedule  # noqa: E402


def cut_model(source: str, blocks: int, out: Path, *, gguf_file: str | None = None) -> Path:
    """The first ``blocks`` blocks of a pretrained model (and its tokenizer) as a folder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = blocks
    causal = "CausalLM" in (config.architectures or [""])[0]
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(source, config=config)  # blocks >= `blocks` are not loaded
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def run_one(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    summary, wall = fresh_run(name, overrides, out)
    keys = ("eval_loss", "eval_accuracy", "test_accuracy", "test_macro_f1", "trainable_params")
    return metrics_of(summary, wall, keys)


def classification(steps: int, work: Path, student_lr: float) -> dict[str, Any]:
    from jobs.models import weights_dir

    teacher_cfg = compose(["model=minilm"])
    student_dir = cut_model(weights_dir(teacher_cfg.model), 3, work / "minilm-3blocks")
    data = ["data=stdlib_docs", "data.test_fraction=0.2"]
    teacher = run_one(
        "teacher", ["model=minilm", *data, "train.lr=1e-4", *one_eval_schedule(steps, 16)], work
    )
    student = [
        "model=hf",
        f"model.path={student_dir}",
        "model.task=sequence_classification",
        *data,
        f"train.lr={student_lr}",
        *one_eval_schedule(steps, 16),
        "run.export=false",
    ]
    term = (
        "objectives=[{name:distill,args:{teacher:"
        + teacher["run_dir"]
        + ",alpha:0.5,temperature:2.0}}]"
    )
    rows = {
        "teacher (MiniLM, 6 blocks)": teacher,
        "student (3 blocks), plain": run_one("student-plain", student, work),
        "student (3 blocks), distilled": run_one("student-distill", student + [term], work),
    }
    plain = rows["student (3 blocks), plain"]["test_accuracy"]
    for row in rows.values():
        row["vs_plain"] = row["test_accuracy"] - plain
    return {"steps": steps, "student_lr": student_lr, "metric": "test_accuracy", "rows": rows}


def causal_lm(steps: int, work: Path) -> dict[str, Any]:
    from jobs.models import weights_dir

    teacher_cfg = compose(["model=smollm2_135m", "data=wordnet_instruct"])
    teacher_dir = weights_dir(teacher_cfg.model)  # the GGUF converted to a folder, cached
    student_dir = cut_model(teacher_dir, 6, work / "smollm2-6blocks")
    student = [
        "model=hf",
        f"model.path={student_dir}",
        "model.task=causal_lm",
        "data=wordnet_instruct",
        "data.max_length=64",
        "train.lr=3e-4",
        *one_eval_schedule(steps, 8),
        "run.export=false",
    ]
    term = f"objectives=[{{name:distill,args:{{teacher:{teacher_dir},alpha:0.5,temperature:1.0}}}}]"
    rows = {
        "student (6 blocks), plain": run_one("lm-student-plain", student, work),
        "student (6 blocks), distilled": run_one("lm-student-distill", student + [term], work),
    }
    plain = rows["student (6 blocks), plain"]["eval_loss"]
    for row in rows.values():
        row["vs_plain"] = row["eval_loss"] - plain
    return {"steps": steps, "metric": "eval_loss", "teacher": teacher_dir, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lm-steps", type=int, default=30)
    parser.add_argument("--student-lr", type=float, default=3e-4)
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    work = args.out / "distill"
    result: dict[str, Any] = {"measured": time.strftime("%Y-%m-%d")}
    result["classification"] = classification(args.steps, work, args.student_lr)
    if not args.skip_lm:
        result["causal_lm"] = causal_lm(args.lm_steps, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(result, indent=2))
    c = result["classification"]
    lines = [
        f"Distillation, stdlib docstrings (8 areas), {c['steps']} steps, ZeRO-2, 2 workers; "
        f"teacher lr 1e-4, students lr {c['student_lr']:g}; alpha 0.5, T 2; test split 20 %",
        "",
        "| run | trainable params | test acc | test macro-F1 | vs plain student | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in c["rows"].items():
        lines.append(
            f"| {name} | {r['trainable_params'] / 1e6:.1f}M | {r['test_accuracy']:.3f} | "
            f"{r['test_macro_f1']:.3f} | {r['vs_plain']:+.3f} | {r['wall_s']:.0f} |"
        )
    if "causal_lm" in result:
        lm = result["causal_lm"]
        lines += [
            "",
            f"Distillation, WordNet instructions, SmolLM2-135M teacher -> 6-block student, "
            f"{lm['steps']} steps; alpha 0.5, T 1; eval loss on responses (lower is better)",
            "",
            "| run | trainable params | eval loss | vs plain student | wall s |",
            "|---|---|---|---|---|",
        ]
        for name, r in lm["rows"].items():
            lines.append(
                f"| {name} | {r['trainable_params'] / 1e6:.1f}M | {r['eval_loss']:.3f} | "
                f"{r['vs_plain']:+.3f} | {r['wall_s']:.0f} |"
            )
    (args.out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
