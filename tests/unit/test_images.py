"""Image data: folder and listing readers, bad files named before Ray, preprocessing as
the model's own image processor does it, deterministic augmentation."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
