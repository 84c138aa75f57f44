"""Do ImageNet weights help on a real image set? EfficientNet-Lite0, offline.

    python tests/benchmarks/bench_vision.py [--steps 60] [--image-size 160] [--per-class 100]
    (or: make bench-vision)

Data: Debian's Oxygen icon theme (package oxygen-icon-theme), its 128x128 PNG icons
grouped by the theme's own categories: actions, apps, devices, mimetypes, places,
status (6 labels). Each category is capped at --per-class icons (a seeded draw) so no
class dominates; transparent backgrounds are composited on white. A JSONL listing of
the paths is written and read as a user's listing would be; 20 % is a held-out test
split, never used to choose anything.

Rows, all EfficientNet-Lite0 for the same --steps on 2 DeepSpeed workers (ZeRO-2), the
model's own preprocessing at --image-size, random resized crops and flips in training:
  - ImageNet weights, feature extraction (the new head alone), lr 1e-2
  - ImageNet weights, full fine-tuning, lr 1e-3
  - ImageNet weights, freeze depth (top 4 of 16 blocks), lr 1e-3
  - the same architecture from scratch (random init), full training, lr 1e-3
Each reports test accuracy and macro-F1, training images/s, and its gain over scratch.
Writes runs/bench/vision.json and vision.md.
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

from tests.benchmarks.common import fresh_run  # noqa: E402

ICONS = Path("/usr/share/icons/oxygen/base/128x128")
CATEGORIES = ("actions", "apps", "devices", "mimetypes", "places", "status")


def write_listing(out: Path, per_class: int, seed: int = 0) -> tuple[Path, dict[str, int]]:
    if not ICONS.is_dir():
        sys.exit(f"bench_vision: {ICONS} is missing; apt-get install oxygen-icon-theme")
    rng = random.Random(seed)
    rows, counts = [], {}
    for category in CATEGORIES:
        icons = sorted((ICONS / category).glob("*.png"))
        picked = sorted(rng.sample(icons, min(per_class, len(icons))))
        counts[category] = len(picked)
        rows += [{"image": str(p), "label": category} for p in picked]
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "icons.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return listing, counts


def run_one(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    summary, wall = fresh_run(name, overrides, out)
    records = [
        json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["examples_per_s"] for r in records if "examples_per_s" in r]
    keys = ("eval_accuracy", "test_accuracy", "test_macro_f1", "trainable_params")
    return {
        **{k: summary.metrics.get(k) for k in keys},
        # the first window includes the engine's first steps: left out
        "train_images_per_s": sum(rates[1:]) / max(len(rates) - 1, 1) if rates else None,
        "wall_s": wall,
        "run_dir": str(summary.run_dir),
    }


ROWS = {
    "ImageNet weights, feature extraction": ["strategy=feature_extraction", "train.lr=1e-2"],
    "ImageNet weights, full fine-tuning": ["strategy=full", "train.lr=1e-3"],
    "ImageNet weights, freeze depth (top 4 blocks)": [
        "strategy=freeze_depth",
        "strategy.num_trainable_blocks=4",
        "train.lr=1e-3",
    ],
    "from scratch, full training": ["strategy=full", "train.lr=1e-3", "model.pretrained=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    work = args.out / "vision"
    listing, counts = write_listing(work, args.per_class)
    steps = args.steps
    base = [
        "model=efficientnet_lite0",
        "data=image_folder",
        f"data.path={listing}",
        "data.augment=true",
        f"data.image_size={args.image_size}",
        "data.test_fraction=0.2",
        "data.eval_fraction=0.1",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.warmup_steps={steps // 10}",
        "train.schedule=linear",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.log_every=10",
        "deepspeed=zero2",
        "run.export=false",
    ]
    rows = {
        name: run_one(f"row{i}", base + extra, work) for i, (name, extra) in enumerate(ROWS.items())
    }
    scratch = rows["from scratch, full training"]["test_accuracy"]
    for row in rows.values():
        row["vs_scratch"] = row["test_accuracy"] - scratch
    result = {
        "measured": time.strftime("%Y-%m-%d"),
        "data": {"source": str(ICONS), "counts": counts, "listing": str(listing)},
        "steps": steps,
        "image_size": args.image_size,
        "global_batch": args.micro_batch * 2,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision.json").write_text(json.dumps(result, indent=2))
    total = sum(counts.values())
    lines = [
        f"EfficientNet-Lite0 on Oxygen icons by category ({len(counts)} labels, {total} icons: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"); {steps} steps, global batch {args.micro_batch * 2}, {args.image_size}px, "
        "augmented, ZeRO-2, 2 workers on 2 CPU cores; test split 20 %",
        "",
        "| run | trainable params | val acc | test acc | test macro-F1 | vs scratch | train images/s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['trainable_params'] / 1e6:.2f}M | {r['eval_accuracy']:.3f} | "
            f"{r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | {r['vs_scratch']:+.3f} | "
            f"{r['train_images_per_s']:.1f} | {r['wall_s']:.0f} |"
        )
    (args.out / "vision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
