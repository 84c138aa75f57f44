"""Where the blocks, embeddings and head live in each architecture family, by module name.

Strategies never look at tensor shapes (under ZeRO-3 every shape is [0]); they ask
``locate(param_name)`` which part of the model a parameter belongs to. Adding an
architecture is one ``Family`` entry: T5 would list ``encoder.block`` and
``decoder.block`` as its block lists; ViT has ``vit.layers``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# peft prefixes every name with this; modules_to_save copies add a segment we skip too.
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Family:
    # Module paths of the ModuleLists holding the blocks, bottom to top.
    blocks: tuple[str, ...]
    embeddings: tuple[str, ...]
    # Task heads (new or retrained); feature extraction trains only these.
    heads: tuple[str, ...]
    # Default LoRA targets: leaf module names inside a block.
    lora_targets: tuple[str, ...]
    # HF config attribute(s) whose sum is the number of blocks.
    num_blocks_attrs: tuple[str, ...] = ("num_hidden_layers",)
    # A decoder: the family has a causal LM form (an LM head can predict the next token).
    causal_lm: bool = False
    # An encoder-decoder (T5, BART): the seq2seq form.
    encoder_decoder: bool = False
    # Modules that belong to the last block of a block list (by its index in ``blocks``):
    # an encoder's final norm trains, and freezes, with the encoder's top block.
    after_blocks: tuple[tuple[str, int], ...] = ()
    # When the block count is not a config attribute (a list of stages, repeats scaled
    # by a depth multiplier): a function of the HF config.
    count: Callable[[Any], int] | None = None
    # What the model reads: "text" (token ids) or "image" (pixel values).
    modality: str = "text"
    # An image-text dual encoder (CLIP): it can also score images against label prompts
    # with no training (jobs/zeroshot.py).
    contrastive: bool = False

    def num_blocks(self, hf_config: Any) -> int:
        if self.count is not None:
            return self.count(hf_config)
        return sum(int(getattr(hf_config, attr)) for attr in self.num_blocks_attrs)


_DECODER = Family(
    blocks=("model.layers",),
    embeddings=("model.embed_tokens",),
    heads=("lm_head", "score"),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    causal_lm=True,
)


def _encoder(prefix: str) -> Family:
    # The pooler only feeds the classifier, and sentence-embedding checkpoints leave it
    # untrained, so it counts as part of the head.
    return Family(
        blocks=(f"{prefix}.encoder.layer",),
        embeddings=(f"{prefix}.embeddings",),
        heads=("classifier", f"{prefix}.pooler"),
        lora_targets=("query", "key", "value"),
    )


def _stages(config: Any) -> int:
    return len(config.depths)


def _efficientnet_blocks(config: Any) -> int:
    # As transformers' EfficientNetEncoder builds them: each stage's repeats scaled up.
    return sum(math.ceil(config.depth_coefficient * n) for n in config.num_block_repeats)


# Vision backbones: a block is a transformer layer (ViT), a stage of residual blocks
# (ResNet, ConvNeXt: 4 stages), or one MBConv block (EfficientNet). The final norm sits
# above the blocks ("other": it trains with the top block's depth, as a decoder's does).
_VIT = Family(
    modality="image",
    blocks=("vit.layers",),
    embeddings=("vit.embeddings",),
    heads=("classifier",),
    lora_targets=("q_proj", "k_proj", "v_proj"),  # (transformers 5 names)
)
_RESNET = Family(
    modality="image",
    blocks=("resnet.encoder.stages",),
    embeddings=("resnet.embedder",),
    heads=("classifier",),
    lora_targets=("convolution",),
    count=_stages,
)
_CONVNEXT = Family(
    modality="image",
    blocks=("convnext.encoder.stages",),
    embeddings=("convnext.embeddings",),
    heads=("classifier",),
    lora_targets=("pwconv1", "pwconv2"),
    count=_stages,
)
_EFFICIENTNET = Family(
    modality="image",
    blocks=("efficientnet.encoder.blocks",),
    embeddings=("efficientnet.embeddings",),
    # The 1x1 convolution and norm after the last block feed only the pooled features.
    heads=("classifier", "efficientnet.encoder.top_conv", "efficientnet.encoder.top_bn"),
    lora_targets=("expand_conv", "project_conv"),
    count=_efficientnet_blocks,
)

# CLIP: fine-tuned as transformers' CLIPForImageClassification (the vision tower, its
# mean patch embedding, a new linear head; the text tower is not loaded), the vision
# layers as the blocks. Zero-shot scoring (jobs/zeroshot.py) uses both towers.
_CLIP = Family(
    modality="image",
    blocks=("vision_model.encoder.layers",),
    embeddings=("vision_model.embeddings", "vision_model.pre_layrnorm"),
    heads=("classifier",),
    lora_targets=("q_proj", "k_proj", "v_proj"),
    count=lambda config: int(config.vision_config.num_hidden_layers),
    # (the pooled output's norm: unused by the classifier, kept with the top layer)
    after_blocks=(("vision_model.post_layernorm", 0),),
    contrastive=True,
)

# Encoder-decoders: the encoder's blocks, then the decoder's (the top blocks are the
# decoder's last). The shared token embedding is the embeddings; T5 ties its LM head to it.
_T5 = Family(
    blocks=("encoder.block", "decoder.block"),
    embeddings=("shared", "encoder.embed_tokens", "decoder.embed_tokens"),
    heads=("lm_head",),
    lora_targets=("q", "k", "v", "o"),
    num_blocks_attrs=("num_layers", "num_decoder_layers"),
    encoder_decoder=True,
    after_blocks=(("encoder.final_layer_norm", 0),),
)
_BART = Family(
    blocks=("model.encoder.layers", "model.decoder.layers"),
    embeddings=(
        "model.shared",
        "model.encoder.embed_tokens",
        "model.decoder.embed_tokens",
        "model.encoder.embed_positions",
        "model.decoder.embed_positions",
        "model.encoder.layernorm_embedding",
        "model.decoder.layernorm_embedding",
    ),
    heads=("lm_head", "final_logits_bias"),
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    num_blocks_attrs=("encoder_layers", "decoder_layers"),
    encoder_decoder=True,
    after_blocks=(("model.encoder.layer_norm", 0),),  # (pre-norm variants: mBART)
)

FAMILIES: dict[str, Family] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "bert": _encoder("bert"),
    "roberta": _encoder("roberta"),
    "vit": _VIT,
    "resnet": _RESNET,
    "convnext": _CONVNEXT,
    "efficientnet": _EFFICIENTNET,
    "clip": _CLIP,
    "t5": _T5,
    "bart": _BART,
}


def family_of(hf_config: Any) -> Family:
    """The architecture's family: a written entry above, else one derived from what
    transformers and peft know of it (``derive``), else a clear error."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in _DERIVED:
        _DERIVED[model_type] = derive(hf_config)
    family = _DERIVED[model_type]
    if family is None:
        raise ValueError(
            f"model: architecture {model_type!r} is not supported yet: transformers gives no "
            "single list of blocks for it (_no_split_modules); supported: "
            f"{', '.join(sorted(FAMILIES))} and single-stack decoders / encoders like them"
        )
    return family


_DERIVED: dict[Any, Family | None] = {}


def derive(hf_config: Any) -> Family | None:
    """A family from the model's own metadata, for a single-stack decoder (Gemma, Phi,
    Qwen, ...) or encoder (DeBERTa, ModernBERT, ...) without an entry: the task model
    built on the meta device (no memory, no weights); its blocks are the one ModuleList
    of the layer class transformers will not split (``_no_split_modules``), its
    embeddings the input embedding (or the ``...Embeddings`` module holding it), its
    heads every top-level module beside the base model (plus the base's pooler), its
    LoRA targets peft's defaults for the type, else every linear layer in a block.
    None where that does not describe the model (encoder-decoders, vision, several
    block lists)."""
    import torch
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = hf_config.model_type
    if getattr(hf_config, "is_encoder_decoder", False):
        return None
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    mapping = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if causal
        else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    model_class = getattr(transformers, str(mapping.get(model_type, "")), None)
    if model_class is None:
        return None
    try:
        with torch.device("meta"):
            model = model_class._from_config(hf_config)
    except Exception:  # an architecture transformers cannot build from this config
        return None
    unsplit = set(getattr(model, "_no_split_modules", None) or ())
    module_lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module)
    ]
    lists = [(n, m) for n, m in module_lists if type(m[0]).__name__ in unsplit]
    if not lists:  # no metadata: the one list as long as the config's layer count
        depth = getattr(hf_config, "num_hidden_layers", None)
        lists = [(n, m) for n, m in module_lists if len(m) == depth]
    if len(lists) != 1:
        return None
    blocks, layers = lists[0]
    names = {id(m): n for n, m in model.named_modules()}
    found = names.get(id(model.get_input_embeddings()))
    if found is None:
        return None
    parent = found.rpartition(".")[0]
    if parent and type(model.get_submodule(parent)).__name__.endswith("Embeddings"):
        found = parent
    embeddings = [found]
    # and what the blocks' parent holds before them (GPT-2's position embedding, a
    # norm of the embeddings); what it holds after them (a final norm) is "other"
    stack, _, _ = blocks.rpartition(".")
    for name, child in model.get_submodule(stack).named_children() if stack else ():
        if name == blocks.rpartition(".")[2]:
            break
        path = f"{stack}.{name}"
        if any(True for _ in child.parameters()) and not path.startswith(found):
            embeddings.append(path)
    base = model.base_model_prefix
    heads = [n for n, _ in model.named_children() if n != base]
    if getattr(getattr(model, base, None), "pooler", None) is not None:
        heads.append(f"{base}.pooler")
    if causal:
        heads.append("score")  # the same decoder as a sequence classifier
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or sorted(
        {
            n.rpartition(".")[2]
            for n, m in layers[0].named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    count = len(layers)
    return Family(
        blocks=(blocks,),
        embeddings=tuple(embeddings),
        heads=tuple(dict.fromkeys(heads)),
        lora_targets=tuple(targets),
        causal_lm=causal,
        count=None if hasattr(hf_config, "num_hidden_layers") else (lambda config: count),
    )


@dataclass(frozen=True)
class Location:
    """Which part of the model a parameter belongs to."""

    kind: str  # "embeddings" | "block" | "head" | "other"
    block: int | None = None  # index over all blocks, bottom (0) to top


def locate(name: str, family: Family, num_blocks_per_list: tuple[int, ...]) -> Location:
    """Place a parameter by its qualified name (peft wrappers included)."""
    name = name.removeprefix(_PEFT_PREFIX)
    for path, which in family.after_blocks:
        if name.startswith(path + "."):
            return Location("block", sum(num_blocks_per_list[: which + 1]) - 1)
    offset = 0
    for path, count in zip(family.blocks, num_blocks_per_list, strict=True):
        match = re.match(rf"{re.escape(path)}\.(\d+)\.", name)
        if match:
            return Location("block", offset + int(match.group(1)))
        offset += count
    if any(name.startswith(p + ".") for p in family.embeddings):
        return Location("embeddings")
    if any(name.startswith(p + ".") for p in family.heads):
        return Location("head")
    return Location("other")


@dataclass(frozen=True)
class Layout:
    """A model's family plus its block counts: all a strategy needs to place parameters."""

    family: Family
    blocks_per_list: tuple[int, ...]

    @classmethod
    def of(cls, hf_config: Any) -> Layout:
        family = family_of(hf_config)
        if len(family.blocks) == 1:
            counts: tuple[int, ...] = (family.num_blocks(hf_config),)
        else:
            counts = tuple(int(getattr(hf_config, attr)) for attr in family.num_blocks_attrs)
        return cls(family, counts)

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_per_list)

    def locate(self, name: str) -> Location:
        return locate(name, self.family, self.blocks_per_list)

    def depth(self, location: Location) -> int:
        """Distance from the top: the top block is 0, embeddings are below every block."""
        if location.kind == "block":
            assert location.block is not None
            return self.num_blocks - 1 - location.block
        if location.kind == "embeddings":
            return self.num_blocks
        return 0  # head and the rest above the blocks (final norm)
