"""Each strategy on tiny LLaMA and tiny BERT: exactly which parameters train, and which
group and learning rate each gets. Names only: layers are found by module name."""

from __future__ import annotations

import re

import pytest
from torch import nn

from conf.schema import LoraConfig, ModelConfig, StrategyConfig
from jobs.config import compose
from jobs.models import Layout, build
from jobs.strategies import apply
from jobs.strategies.discriminative import merge_alike, param_groups

LR = 1e-3


def _model(name: str) -> tuple[nn.Module, Layout]:
    model_cfg: ModelConfig = compose(
        [f"model={name}", "data=wordnet_instruct"] if name == "tiny_llama" else [f"model={name}"]
    ).model
    model_cfg.task = "sequence_classification"  # a new head on both families
    model, _ = build(model_cfg, labels=["a", "b", "c"])
    return model, Layout.of(model.config)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _blocks_of(names: set[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.search(r"\.(?:layers|layer)\.(\d+)\.", n))}


HEADS = {
    "tiny_llama": {"score.weight"},
    "tiny_bert": {
        "classifier.weight",
        "classifier.bias",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
    },
}
EMBEDDINGS = {"tiny_llama": "model.embed_tokens.", "tiny_bert": "bert.embeddings."}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_full_trains_everything(arch: str) -> None:
    model, layout = _model(arch)
    model = apply(model, StrategyConfig(name="full"), layout)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_feature_extraction_trains_only_the_head(arch: str) -> None:
    model, layout = _model(arch)
    model = apply(model, StrategyConfig(name="feature_extraction"), layout)
    assert _trainable(model) == HEADS[arch]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("k", [0, 1, 3, 4])
@pytest.mark.parametrize("train_embeddings", [False, True])
def test_freeze_depth_trains_the_top_k_blocks(arch: str, k: int, train_embeddings: bool) -> None:
    model, layout = _model(arch)
    model = apply(
        model,
        StrategyConfig(
            name="freeze_depth", num_trainable_blocks=k, train_embeddings=train_embeddings
        ),
        layout,
    )
    trainable = _trainable(model)
    assert layout.num_blocks == 4
    assert _blocks_of(trainable) == set(range(4 - k, 4))
    assert HEADS[arch] <= trainable
    assert any(n.startswith(EMBEDDINGS[arch]) for n in trainable) == train_embeddings
    # Every parameter of a trainable block trains: nothing is picked by shape.
    for n, p in model.named_parameters():
        if _blocks_of({n}) and min(_blocks_of({n})) >= 4 - k:
            assert p.requires_grad, n
    if arch == "tiny_llama":
        assert ("model.norm.weight" in trainable) == (k > 0)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("k", [None, 2])
def test_lora_adapts_attention_in_the_top_k_blocks_and_trains_the_new_head(
    arch: str, k: int | None
) -> None:
    model, layout = _model(arch)
    model = apply(
        model, StrategyConfig(name="lora", num_trainable_blocks=k, lora=LoraConfig(r=4)), layout
    )
    trainable = _trainable(model)
    adapters = {n for n in trainable if ".lora_" in n}
    others = trainable - adapters
    assert _blocks_of(adapters) == (set(range(4)) if k is None else {2, 3})
    targets = (
        {"q_proj", "k_proj", "v_proj", "o_proj"}
        if arch == "tiny_llama"
        else {"query", "key", "value"}
    )
    assert {re.search(r"\.(\w+)\.lora_", n).group(1) for n in adapters} == targets  # type: ignore[union-attr]
    assert len(adapters) == 2 * len(targets) * (4 if k is None else 2)  # lora_A and lora_B each
    # The new head trains in full (peft modules_to_save); nothing else does.
    stripped = {re.sub(r"^base_model\.model\.|modules_to_save\.default\.", "", n) for n in others}
    assert stripped == HEADS[arch]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_discriminative_lrs_decay_with_depth_and_the_head_has_its_own(arch: str) -> None:
    model, layout = _model(arch)
    model = apply(model, StrategyConfig(name="full"), layout)
    groups = param_groups(model, layout, lr=LR, lr_ratio=0.5, head_lr_mult=10.0)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(10 * LR)
    for i in range(4):
        assert lrs[f"block.{i}"] == pytest.approx(LR * 0.5 ** (3 - i))  # top block (3) gets lr
    assert lrs["embeddings"] == pytest.approx(LR * 0.5**4)
    if arch == "tiny_llama":
        assert lrs["other"] == pytest.approx(LR)  # final norm, above the top block
    # Each trainable parameter is in exactly one group, and the group matches its place.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert (
                g["name"] == "head"
                or not g["name"].startswith("block.")
                or f".{g['name'][6:]}." in names[id(p)]
            )


def test_weight_decay_skips_biases_and_norms() -> None:
    model, layout = _model("tiny_bert")
    groups = param_groups(
        apply(model, StrategyConfig(name="full"), layout), layout, lr=LR, weight_decay=0.1
    )
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            is_bias_or_norm = names[id(p)].endswith(("bias", "LayerNorm.weight"))
            assert g["weight_decay"] == (0.0 if is_bias_or_norm else 0.1), names[id(p)]
            assert g["name"].endswith(".no_decay") == is_bias_or_norm


def test_groups_with_equal_settings_become_one_optimizer_group() -> None:
    """Under ZeRO each optimizer group is a flat buffer with its own collectives: equal
    groups are merged, every parameter kept once, every group's name kept for the logs."""
    model, layout = _model("tiny_bert")
    model = apply(model, StrategyConfig(name="full"), layout)
    groups = param_groups(model, layout, lr=LR, weight_decay=0.1)
    merged = merge_alike(groups)
    assert len(groups) > 2 and len(merged) == 2  # decay and no decay
    assert {g["weight_decay"] for g in merged} == {0.0, 0.1}
    assert sorted(n for g in merged for n in g["names"]) == sorted(g["name"] for g in groups)
    assert sorted(id(p) for g in merged for p in g["params"]) == sorted(
        id(p) for g in groups for p in g["params"]
    )
    for g in merged:
        assert all(n.endswith(".no_decay") == (g["weight_decay"] == 0.0) for n in g["names"])
    # Distinct lrs stay distinct groups (discriminative lrs are kept).
    decaying = param_groups(model, layout, lr=LR, lr_ratio=0.5, head_lr_mult=10.0)
    assert len(merge_alike(decaying)) == len(decaying)
    assert [g["names"] for g in merge_alike(merged)] == [g["names"] for g in merged]


def test_discriminative_groups_cover_only_lora_and_head_under_lora() -> None:
    model, layout = _model("tiny_llama")
    model = apply(model, StrategyConfig(name="lora", num_trainable_blocks=2), layout)
    groups = param_groups(model, layout, lr=LR, lr_ratio=0.8, head_lr_mult=2.0)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {"block.2": LR * 0.8, "block.3": LR, "head": 2 * LR}
    )


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_lora_variants_come_from_peft(variant: str) -> None:
    """strategy.lora.variant: peft's DoRA (a trained magnitude vector per adapted layer)
    and rsLoRA (scaling alpha/sqrt(r) instead of alpha/r)."""
    import math

    model, layout = _model("tiny_llama")
    lora = LoraConfig(r=4, alpha=8, variant=variant)
    model = apply(model, StrategyConfig(name="lora", lora=lora), layout)
    trainable = _trainable(model)
    magnitudes = {n for n in trainable if "lora_magnitude_vector" in n}
    assert bool(magnitudes) == (variant == "dora")
    scaling = next(
        m.scaling["default"]
        for m in model.modules()
        if isinstance(getattr(m, "scaling", None), dict)
    )
    assert scaling == pytest.approx(8 / math.sqrt(4) if variant == "rslora" else 8 / 4)


def test_an_unknown_lora_variant_is_refused_with_the_allowed_ones() -> None:
    from conf.schema import ConfigError

    with pytest.raises(ConfigError, match="strategy.lora.variant") as raised:
        LoraConfig(variant="qdora").check()
    assert "dora" in str(raised.value) and "rslora" in str(raised.value)
