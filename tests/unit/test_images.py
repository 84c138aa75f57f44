"""Image data: folder and listing readers, bad files named before Ray, preprocessing as
the model's own image processor does it, deterministic augmentation."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conf.schema import ConfigError
from jobs.data import images


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(rng.normal(color, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _folder(root: Path) -> Path:
    _png(root / "red" / "a.png", (220, 30, 30))
    _png(root / "red" / "nested" / "b.jpg", (200, 40, 20))
    _png(root / "blue" / "c.png", (20, 30, 220))
    (root / "blue" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped
    return root


def test_an_image_folder_gives_one_label_per_sub_folder(tmp_path: Path) -> None:
    records = images.read_folder(_folder(tmp_path / "photos"), key="data.path")
    assert [(Path(r["image"]).name, r["label"]) for r in records] == [
        ("c.png", "blue"),
        ("a.png", "red"),
        ("b.jpg", "red"),
    ]
    images.check_images(records, key="data.path")


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: (root / "red" / "notes.txt").write_text("x"), "notes.txt: not an image file"),
        (
            lambda root: (root / "loose.png").write_bytes(b"x"),
            "has files at its top level (loose.png)",
        ),
    ],
)
def test_folder_layout_errors_name_the_path(tmp_path: Path, damage, named: str) -> None:  # type: ignore[no-untyped-def]
    root = _folder(tmp_path / "photos")
    damage(root)
    with pytest.raises(ConfigError, match=r"data\.path") as e:
        images.read_folder(root, key="data.path")
    assert named in str(e.value)


def test_unreadable_and_missing_images_are_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    (root / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = images.read_folder(root, key="data.path")
    with pytest.raises(ConfigError) as e:
        images.check_images(records, key="data.path")
    assert "broken.png: not a readable image" in str(e.value)
    truncated = root / "red" / "cut.png"
    truncated.write_bytes((root / "red" / "a.png").read_bytes()[:60])
    with pytest.raises(ConfigError, match="cut.png: not a readable image"):
        images.check_images([{"image": str(truncated), "label": "red"}], key="data.path")
    with pytest.raises(ConfigError, match="gone.png: no such image file"):
        images.check_images([{"image": str(root / "gone.png"), "label": "red"}], key="data.path")
    with pytest.raises(ConfigError, match="is not a directory"):
        images.read_folder(tmp_path / "nowhere", key="data.path")


def test_a_listing_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    _folder(tmp_path / "photos")
    listing = tmp_path / "photos" / "train.jsonl"
    listing.write_text(json.dumps({"image": "red/a.png", "label": "red"}) + "\n")
    (record,) = images.resolve([json.loads(listing.read_text())], listing)
    assert Path(record["image"]) == (tmp_path / "photos" / "red" / "a.png").resolve()


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_eval_preprocessing_matches_the_models_image_processor(tmp_path: Path, kind: str) -> None:
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    processor = (
        ViTImageProcessor(size={"height": 32, "width": 32})
        if kind == "vit"
        else ConvNextImageProcessor(size={"shortest_edge": 32})  # crop_pct 0.875
    )
    path = _png(tmp_path / "x.png", (120, 60, 200), size=(48, 36))
    prep = images.Preprocess.from_processor(processor)
    ours = prep(path)
    theirs = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)


def test_augmentation_is_random_but_reproducible(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    path = _png(tmp_path / "x.png", (120, 60, 200), size=(64, 48))
    prep = images.Preprocess.from_processor(ViTImageProcessor(size={"height": 24, "width": 24}))
    a, b = prep(path, random.Random(1)), prep(path, random.Random(1))
    c = prep(path, random.Random(2))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, prep(path))


# ------------------------------------------------------------------ the task and its checks
def _compose(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    from jobs.config import compose

    return compose(["model=tiny_vit", "data=image_folder", f"data.path={root}", *extra])


def _many(root: Path, per_class: int = 6) -> Path:
    for label, colour in (
        ("red", (220, 30, 30)),
        ("blue", (20, 30, 220)),
        ("green", (20, 200, 40)),
    ):
        for i in range(per_class):
            _png(root / label / f"{i}.png", tuple(c + i for c in colour))  # type: ignore[arg-type]
    return root


def test_augmented_batches_resume_exactly_and_eval_batches_are_fixed(tmp_path: Path) -> None:
    """A resumed run (train_batches from a later micro step) sees the very crops and
    flips the uninterrupted run saw; each epoch draws new ones; eval never augments."""
    from jobs import data as data_lib
    from jobs import tasks
    from jobs.models import build

    cfg = _compose(_many(tmp_path / "photos"), "data.augment=true", "data.eval_fraction=0.2")
    task = tasks.get(cfg.model)
    dataset = data_lib.load(cfg.data, task)
    _, processor = build(cfg.model, labels=dataset.labels)
    encoded = task.encode(dataset.train, processor, cfg.data, dataset.labels)

    def stream(start: int) -> Any:
        return data_lib.train_batches(
            encoded,
            rank=1,
            world_size=2,
            seed=3,
            micro_batch_size=2,
            pad_id=0,
            start_micro_step=start,
            collate_fn=task.collate,
        )

    whole = stream(0)
    first = [next(whole)["pixel_values"] for _ in range(12)]  # 3 epochs of 4 micro batches
    resumed = stream(5)
    for expected in first[5:]:
        assert torch.equal(next(resumed)["pixel_values"], expected)
    # each epoch draws new crops: no batch repeats across the 3 epochs
    assert len({t.sum().item() for t in first}) == len(first)
    eval_a = data_lib.eval_batches(
        encoded, rank=0, world_size=1, micro_batch_size=4, pad_id=0, collate_fn=task.collate
    )
    eval_b = data_lib.eval_batches(
        encoded, rank=0, world_size=1, micro_batch_size=4, pad_id=0, collate_fn=task.collate
    )
    plain = images.Preprocess.from_processor(processor)
    assert torch.equal(eval_a[0][0]["pixel_values"], eval_b[0][0]["pixel_values"])
    assert torch.equal(eval_a[0][0]["pixel_values"][0], plain(encoded[0]["image"]))
    assert eval_a[0][0]["pixel_values"].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    ("make", "extra", "key", "message"),
    [
        (
            lambda r: _png(r / "red" / "0.png", (200, 0, 0)).parent,
            (),
            "data.path",
            "at least 2 labels",
        ),
        (
            lambda r: (_many(r), (r / "purple").mkdir())[0],
            (),
            "data.path",
            "'purple' holds no images",
        ),
        (
            lambda r: (_many(r), (r / "red" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"))[0],
            (),
            "data.path",
            "9.png: not a readable image",
        ),
        (_many, ("data.labels=[red,blue,purple]",), "data.labels", "['purple'] have no images"),
        (_many, ("data.image_size=48",), "data.image_size", "cannot take 48x48 images"),
        (_many, ("model=tiny_bert", "model.task=image_classification"), "model.task", "reads text"),
        (
            _many,
            (
                "data.max_length=16",
                "data.task=classification",
                "model.task=sequence_classification",
            ),
            "model.task",
            "reads images",
        ),
        (
            _many,
            ("data.task=classification",),
            "model.task",
            "needs model.task=sequence_classification",
        ),
    ],
)
def test_bad_image_input_is_refused_before_ray_with_the_key(  # type: ignore[no-untyped-def]
    tmp_path: Path, make, extra: tuple[str, ...], key: str, message: str
) -> None:
    from jobs.preflight import preflight

    root = tmp_path / "photos"
    root.mkdir()
    make(root)
    with pytest.raises(ConfigError) as e:
        preflight(_compose(root, *extra))
    assert e.value.key == key and message in str(e.value), str(e.value)


def test_augment_on_text_and_text_sources_for_images_are_refused() -> None:
    from jobs.config import compose

    with pytest.raises(ConfigError, match="data.augment: applies to images"):
        compose(["model=tiny_bert", "data=stdlib_docs", "data.augment=true"]).check()
    with pytest.raises(ConfigError, match="data.source: stdlib_docs is text"):
        compose(["model=tiny_vit", "data=stdlib_docs", "data.task=image_classification"]).check()


def test_a_jsonl_listing_with_its_own_field_names_loads_like_a_folder(tmp_path: Path) -> None:
    from jobs import data as data_lib
    from jobs import tasks

    root = _many(tmp_path / "photos", per_class=4)
    listing = tmp_path / "all.jsonl"
    rows = [
        {"file": f"photos/{label}/{i}.png", "kind": label}
        for label in ("red", "blue", "green")
        for i in range(4)
    ]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _compose(listing, "data.image_field=file", "data.label_field=kind")
    dataset = data_lib.load(cfg.data, tasks.get(cfg.model))
    folder = data_lib.load(_compose(root).data, tasks.get(cfg.model))
    assert dataset.labels == folder.labels == ["blue", "green", "red"]
    assert sorted(r["image"] for r in dataset.train + dataset.eval) == sorted(
        str(Path(r["image"]).resolve()) for r in folder.train + folder.eval
    )
    listing.write_text(json.dumps({"file": "photos/red/missing.png", "kind": "red"}) + "\n")
    with pytest.raises(ConfigError, match="missing.png: no such image file"):
        data_lib.load(cfg.data, tasks.get(cfg.model))
