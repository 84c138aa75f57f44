"""Shared fixtures: small real datasets written to disk, tiny configs, a real local Ray."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train drains reports on this tick; tiny test runs report every few hundred ms.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).parents[1] / ".cache" / "torch_extensions")
)

COLORS = {
    "apple": "red",
    "banana": "yellow",
    "lime": "green",
    "plum": "purple",
    "orange": "orange",
    "cherry": "red",
    "kiwi": "green",
    "lemon": "yellow",
    "grape": "purple",
    "peach": "pink",
}
POSITIVE = ["great", "wonderful", "lovely", "excellent", "happy", "good", "superb", "fine"]
NEGATIVE = ["awful", "terrible", "horrid", "bad", "sad", "poor", "dreadful", "grim"]


def write_classification(path: Path, n: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            a, b = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
            f.write(json.dumps({"text": f"the film was {a} and {b}", "label": label}) + "\n")
    return path


def write_instructions(path: Path, n: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    fruits = sorted(COLORS)
    with path.open("w") as f:
        for _ in range(n):
            fruit = rng.choice(fruits)
            f.write(json.dumps({"prompt": f"color of {fruit}?", "response": COLORS[fruit]}) + "\n")
    return path


def write_colors(path: Path, n: int = 240, seed: int = 3) -> Path:
    """A second labelled task for multi-task runs: a fruit's color (6 labels)."""
    rng = random.Random(seed)
    fruits = sorted(COLORS)
    with path.open("w") as f:
        for _ in range(n):
            fruit = rng.choice(fruits)
            f.write(
                json.dumps({"text": f"a ripe {fruit} on the table", "label": COLORS[fruit]}) + "\n"
            )
    return path


def write_target_domain(path: Path, n: int = 96, seed: int = 1, labelled: bool = False) -> Path:
    """The classification set's sentiment words in another domain's sentences (books
    instead of films): DANN's unlabelled target data, or with labels its target eval."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            a, b = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
            record = {"text": f"reading this novel felt {a}; its ending was {b}"}
            if labelled:
                record["label"] = label
            f.write(json.dumps(record) + "\n")
    return path


# `make test` hands whole files to 2 pytest-xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder): the longest first, so the two end together
# (longest-processing-time-first). Seconds per file as measured in a clean clone on
# 2 cores; a file not listed goes after these, unit tests (seconds each) last.
SLOWEST_FIRST = [
    "tests/integration/test_finetune.py",  # ~550 s: every gang run but the resumes
    "tests/integration/test_resume.py",  # ~450 s: with the world-size changes
    "tests/integration/test_sweep.py",  # ~400 s
    "tests/integration/test_recovery.py",  # ~400 s: real signals, drivers as processes
    "tests/integration/test_pool.py",  # ~240 s
    "tests/integration/test_families.py",  # ~230 s: ViT, ResNet, T5 in one gang
    "tests/integration/test_cli.py",  # ~230 s: the demo on real MiniLM
    "tests/integration/test_jobs.py",  # ~140 s: a second Ray cluster, Jobs API
    "tests/integration/test_plan.py",  # ~90 s
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow files first (SLOWEST_FIRST), then other integration files, then unit tests;
    the tests of one file keep their order."""

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        if path in SLOWEST_FIRST:
            return SLOWEST_FIRST.index(path)
        return len(SLOWEST_FIRST) + (item.get_closest_marker("integration") is None)

    items.sort(key=rank)


IMAGE_CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 210)}


def write_images(root: Path, per_class: int = 40, seed: int = 5) -> Path:
    """An image folder (root/<label>/*.png): noisy pictures whose dominant colour is the
    label, a shape of another colour on top; sizes and aspect ratios vary (24-48 px)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label, colour in IMAGE_CLASSES.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(24, 49, size=2))
            pixels = np.clip(
                np.array(colour) + rng.normal(0, 40, size=(height, width, 3)), 0, 255
            ).astype(np.uint8)
            image = Image.fromarray(pixels)
            x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            ImageDraw.Draw(image).ellipse((x, y, x + width // 3, y + height // 3), fill=fill)
            image.save(folder / f"{label}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_classification(root / "cls.jsonl")
    write_target_domain(root / "target.jsonl")
    write_target_domain(root / "target_eval.jsonl", n=48, seed=2, labelled=True)
    write_instructions(root / "instruct.jsonl")
    write_colors(root / "colors.jsonl")
    (root / "text.txt").write_text(
        "\n\n".join(f"the {f} is {c}." for f, c in sorted(COLORS.items())) * 3
    )
    write_prose(root / "prose.txt")
    write_images(root / "images")
    return root


def write_prose(path: Path, n: int = 160, seed: int = 4) -> Path:
    """Plain text for a language-model task: short sentences about the fruits' colors."""
    rng = random.Random(seed)
    fruits = sorted(COLORS)
    lines = []
    for _ in range(n):
        fruit = rng.choice(fruits)
        lines.append(f"a {fruit} is {COLORS[fruit]} when it is ripe.")
    path.write_text("\n\n".join(lines))
    return path


def write_teacher(
    path: Path,
    data_dir: Path,
    *,
    task: str = "classification",
    labels: list[str] | None = None,
    train_steps: int = 0,
) -> Path:
    """A distillation teacher: the student's tiny family with 2 blocks (seed 1), trained
    in-process for ``train_steps`` on the task's data file, saved as a model folder."""
    import dataclasses

    import torch

    from jobs import data as data_lib
    from jobs import tasks
    from jobs.config import compose
    from jobs.models import build

    cfg = compose(tiny_overrides(data_dir, task=task))
    arch = {**cfg.model.arch, "num_hidden_layers": 2}  # type: ignore[dict-item]
    model, tokenizer = build(dataclasses.replace(cfg.model, arch=arch), labels=labels, seed=1)
    if train_steps:
        kind = tasks.get(cfg.model)
        dataset = data_lib.load(cfg.data, kind)
        encoded = kind.encode(dataset.train, tokenizer, cfg.data, labels)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(train_steps):
            pick = torch.randint(len(encoded), (16,), generator=generator).tolist()
            batch = kind.collate([encoded[i] for i in pick], tokenizer.pad_token_id)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(
    data_dir: Path, *, task: str = "instruction", model: str | None = None
) -> list[str]:
    """A tiny model on a tiny real dataset: a full run takes seconds per step count."""
    if task == "classification":
        base = [
            f"model={model or 'tiny_bert'}",
            "data=jsonl",
            f"data.path={data_dir / 'cls.jsonl'}",
        ]
    else:
        base = [
            f"model={model or 'tiny_llama'}",
            "data=jsonl",
            "data.task=instruction",
            f"data.path={data_dir / 'instruct.jsonl'}",
        ]
    return base + [
        "data.max_length=32",
        "data.eval_fraction=0.2",
        "train.max_steps=12",
        "train.micro_batch_size=8",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "train.schedule=constant",
        "train.eval_every=6",
        "train.checkpoint_every=6",
        "train.log_every=1",
        "scaling=local",
        "cluster.num_cpus=2",
    ]


def fresh_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """``code`` run in a new interpreter (nothing imported, registered or connected yet),
    from the repository; its stdout. Fails the test, with its stderr, if it exits non-zero."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="session")
def ray_2cpus() -> Iterator[None]:
    """A real local Ray with 2 CPUs for the whole session (started once: ~8 s)."""
    import ray

    from cluster.connect import connect
    from conf.schema import ClusterConfig, ScalingConfig

    connect(ClusterConfig(num_cpus=2, dashboard=False), ScalingConfig(num_workers=2))
    yield
    ray.shutdown()
