"""`graft plan`: counts on the meta device, DeepSpeed's estimators, checks, --recommend.

The ±15% comparison with measured runs is in tests/integration/test_plan.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import Result
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from typer.testing import CliRunner

from conf.schema import ConfigError
from jobs import plan, strategies
from jobs.config import compose
from jobs.models import Layout, build
from jobs.preflight import preflight

LLM = ["data=jsonl", "data.path=unused.jsonl", "data.task=instruction"]
TINY = ["model=tiny_llama", *LLM, "data.max_length=64"]
LLAMA8B = ["model=llama3_8b", *LLM, "data.max_length=2048", "deepspeed.bf16=true"]


def _plan(overrides: list[str], **kwargs: object) -> plan.Plan:
    return plan.estimate(compose(overrides), **kwargs)  # type: ignore[arg-type]


def test_llama3_configs_have_their_published_sizes_and_plan_in_seconds() -> None:
    # Meta's model cards: 8.03B and 70.6B parameters. Nothing is allocated.
    assert plan.trace(compose(LLAMA8B), seq_len=8)[0].total == 8_030_261_248
    counts = plan.trace(compose([*LLAMA8B, "model=llama3_70b"]), seq_len=8)[0]
    assert counts.total == 70_553_706_496 and counts.num_blocks == 80


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=full"],
        ["strategy=lora", "strategy.lora.r=8"],
        ["strategy=freeze_depth", "strategy.num_trainable_blocks=1"],
        ["strategy=feature_extraction"],
    ],
)
def test_meta_counts_equal_the_real_model_under_each_strategy(strategy: list[str]) -> None:
    cfg = compose([*TINY, *strategy])
    counts, _ = plan.trace(cfg)
    model, _ = build(cfg.model)
    model = strategies.apply(model, cfg.strategy, Layout.of(model.config))
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < counts.trainable <= counts.total


def test_largest_layer_is_deepspeeds_definition() -> None:
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = compose(TINY)
    model, _ = build(cfg.model)
    assert plan.trace(cfg)[0].largest_layer == model_to_params(model)[1]


@pytest.mark.parametrize("world", [1, 2, 8, 64])
def test_bf16_zero2_model_states_equal_deepspeeds_estimator(world: int) -> None:
    counts = plan.trace(compose(LLAMA8B), seq_len=8)[0]
    for offload in (False, True):
        m = plan.model_states(counts, stage=2, world=world, bf16=True, offload_optimizer=offload)
        _, gpu = estimate_zero2_model_states_mem_needs(
            counts.total, num_gpus_per_node=world, cpu_offload=offload
        )
        assert m.model_states == pytest.approx(gpu, abs=8)  # integer division per term
        assert (m.host > 0) == offload


@pytest.mark.parametrize("world", [2, 8, 64])
@pytest.mark.parametrize(("offload_optimizer", "offload_params"), [(0, 0), (1, 0), (1, 1)])
def test_bf16_zero3_model_states_equal_deepspeeds_estimator(
    world: int, offload_optimizer: int, offload_params: int
) -> None:
    counts = plan.trace(compose(LLAMA8B), seq_len=8)[0]
    m = plan.model_states(
        counts,
        stage=3,
        world=world,
        bf16=True,
        offload_optimizer=bool(offload_optimizer),
        offload_params=bool(offload_params),
    )
    _, gpu, largest = estimate_zero3_model_states_mem_needs(
        counts.total,
        counts.largest_layer,
        num_gpus_per_node=world,
        cpu_offload=bool(offload_optimizer),
        cpu_offload_params=bool(offload_params),
    )
    # DeepSpeed's gathered layer is 4 bytes x its parameters; the rest is partitioned.
    assert m.gathered == largest
    assert m.model_states + m.gathered == pytest.approx(gpu, abs=8)


def test_frozen_parameters_and_lora_have_no_gradient_or_optimizer_memory() -> None:
    full = _plan([*LLAMA8B, "deepspeed=zero2"], num_gpus=8)
    lora = _plan([*LLAMA8B, "deepspeed=zero2", "strategy=lora"], num_gpus=8)
    frozen = _plan(
        [*LLAMA8B, "deepspeed=zero2", "strategy=freeze_depth", "strategy.num_trainable_blocks=4"],
        num_gpus=8,
    )
    assert lora.memory.params == pytest.approx(full.memory.params, rel=0.01)  # all stored
    assert lora.memory.optimizer < full.memory.optimizer / 500
    assert full.memory.optimizer > frozen.memory.optimizer > lora.memory.optimizer
    assert lora.counts.trainable / lora.counts.total < 0.01


def test_qlora_stores_the_frozen_base_in_about_four_bits() -> None:
    lora = _plan([*LLAMA8B, "strategy=lora", "scaling=gpu8"])
    qlora = _plan([*LLAMA8B, "strategy=lora", "strategy.lora.quantize=nf4", "scaling=gpu8"])
    assert qlora.counts.quantized > 0.8 * qlora.counts.total
    assert qlora.memory.params < 0.45 * lora.memory.params


def test_activations_scale_with_batch_and_checkpointing_saves_most_of_them() -> None:
    counts, acts = plan.trace(compose(LLAMA8B))
    assert acts.bytes(4, False) == 4 * acts.bytes(1, False)
    assert acts.bytes(1, True) < acts.bytes(1, False) / 3
    # Identical blocks save the same (the first also keeps the embedding output).
    assert len(set(acts.per_block[1:])) == 1 and acts.per_block[1] > 0
    # The head's logits in fp32 dominate what is saved outside the blocks (vocab 128k).
    assert acts.outside >= 2048 * 128_256 * 4
    # Longer sequences cost more than linearly only through attention; flash keeps it ~linear.
    _, longer = plan.trace(compose(LLAMA8B), seq_len=4096)
    assert 1.9 < longer.bytes(1, False) / acts.bytes(1, False) < 2.2


def test_zero3_keeps_the_inputs_of_frozen_layers() -> None:
    # DeepSpeed's ZeRO-3 linear saves its input even when the weight is frozen.
    lora2 = _plan([*TINY, "strategy=lora", "deepspeed=zero2"])
    lora3 = _plan([*TINY, "strategy=lora", "deepspeed=zero3"])
    assert lora3.memory.activations > 1.1 * lora2.memory.activations


def _levels(p: plan.Plan) -> dict[str, str]:
    return {c.key: c.level for c in p.checks}


def test_incompatible_combinations_are_flagged_with_the_key() -> None:
    qlora3 = _plan([*LLAMA8B, "strategy=lora", "strategy.lora.quantize=nf4", "deepspeed=zero3"])
    assert _levels(qlora3)["strategy.lora.quantize"] == "error" and not qlora3.ok
    assert any("ZeRO-3" in c.message for c in qlora3.checks if c.level == "error")

    too_long = _plan([*LLAMA8B, "data.max_length=16384"])
    assert _levels(too_long)["data.max_length"] == "error"
    assert any("8192" in c.message for c in too_long.checks)

    offload = _plan([*LLAMA8B, "deepspeed=zero3_offload"])
    assert _levels(offload)["deepspeed.offload_optimizer"] == "warn" and offload.memory.host > 0

    with pytest.raises(ConfigError, match="deepspeed.offload_params.*stage=3"):
        _plan([*LLAMA8B, "deepspeed=zero2", "deepspeed.offload_params=true"])

    merged = _plan([*LLAMA8B, "strategy=lora", "deepspeed=zero3", "run.export_merged=true"])
    assert _levels(merged)["run.export_merged"] == "warn"
    assert _levels(merged)["deepspeed.stage"] == "ok"


def test_gpus_versus_scaling_and_batch_divisibility() -> None:
    cpu = _plan(LLAMA8B, num_gpus=8)
    assert _levels(cpu)["scaling.gpus_per_worker"] == "warn"
    gpu8 = _plan([*LLAMA8B, "scaling=gpu8"], num_gpus=16)
    assert _levels(gpu8)["scaling.num_workers"] == "warn"
    # 8 workers x micro batch 8 = 64; on 16 ranks that is accumulation... 64/(16*8) not whole.
    assert _levels(gpu8)["train.grad_accum_steps"] == "warn"
    kept = _plan([*LLAMA8B, "scaling=gpu8", "train.grad_accum_steps=4"], num_gpus=16)
    message = next(c for c in kept.checks if c.key == "train.grad_accum_steps")
    assert message.level == "ok" and "train.grad_accum_steps=2" in message.message
    assert "scaling.num_workers" not in _levels(_plan([*LLAMA8B, "scaling=gpu8"], num_gpus=8))


def test_fit_verdict_against_the_device() -> None:
    p = _plan([*LLAMA8B, "model=llama3_70b", "scaling=gpu8"], device_bytes=80 * plan.GiB)
    assert p.fits is False and not p.ok
    assert any(c.key == "memory" and "--recommend" in c.message for c in p.checks)


def test_recommend_gives_the_cheapest_overrides_that_really_fit() -> None:
    base = [*LLAMA8B, "model=llama3_70b", "scaling=gpu8", "train.micro_batch_size=4"]
    device = 80 * plan.GiB
    options = plan.recommend(compose(base), num_gpus=8, device_bytes=device)
    assert options and all(o.total <= device for o in options)
    assert [o.cost for o in options] == sorted(o.cost for o in options)
    # The first option, pasted as overrides, plans as fitting.
    pasted = _plan(plan.merge(base, options[0].overrides), device_bytes=device)
    assert pasted.fits and pasted.memory.total == options[0].total
    # 70B on 8 x 80 GiB with full fine-tuning needs ZeRO-3 (16 bytes/param / 8 > 80 GiB otherwise).
    assert "deepspeed=zero3" in options[0].overrides

    assert plan.recommend(compose(base), num_gpus=1, device_bytes=plan.GiB) == []


def test_recommend_keeps_the_configuration_when_it_fits() -> None:
    options = plan.recommend(compose(TINY), num_gpus=2, device_bytes=80 * plan.GiB)
    assert options[0].overrides == ("deepspeed=zero0",) and options[0].cost == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("40GB", 40 * 10**9),
        ("24 GiB", 24 * 2**30),
        ("1.5TiB", int(1.5 * 2**40)),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert plan.parse_size(text) == expected


def test_parse_size_names_the_option() -> None:
    with pytest.raises(ConfigError, match="--gpu-memory.*80GiB"):
        plan.parse_size("lots")


def test_config_only_models_and_qlora_are_refused_for_training_with_the_key() -> None:
    with pytest.raises(ConfigError, match="model.config_only.*model.path"):
        preflight(compose(LLAMA8B))
    with pytest.raises(ConfigError, match="strategy.lora.quantize"):
        preflight(compose([*TINY, "strategy=lora", "strategy.lora.quantize=nf4"]))
    with pytest.raises(ConfigError, match="strategy.lora.quantize.*'nf4'"):
        compose([*TINY, "strategy=lora", "strategy.lora.quantize=int3"]).check()


def _cli(*args: str) -> Result:
    from cluster.cli import app

    return CliRunner().invoke(app, ["plan", *args])


def test_cli_plan_prints_the_table_and_exits_by_verdict() -> None:
    fits = _cli(
        *LLAMA8B, "strategy=lora", "deepspeed=zero3", "scaling=gpu8", "train.micro_batch_size=1"
    )
    assert fits.exit_code == 0, fits.output
    assert "optimizer states" in fits.stdout and "fits:" in fits.stdout
    assert "with activation checkpointing on" in fits.stdout

    too_big = _cli(*LLAMA8B, "model=llama3_70b", "scaling=gpu8", "--recommend", "--json")
    assert too_big.exit_code == 1
    data = json.loads(too_big.stdout)
    assert data["fits"] is False and data["params"]["total"] == 70_553_706_496
    assert data["recommend"] and data["recommend"][0]["total"] <= 80 * 2**30

    bad = _cli(*TINY, "deepspeed.stage=5")
    assert bad.exit_code == 2 and "deepspeed" in bad.output


def test_trace_leaves_torch_functions_as_they_were() -> None:
    before = torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention
    plan.trace(compose([*TINY, "deepspeed=zero3"]))
    after = torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention
    assert before == after


def test_loss_terms_frozen_parameters_are_planned(data_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """L2-SP keeps a copy of each trained pretrained weight outside the heads, EWC two
    (reference and Fisher), distillation its whole teacher; ZeRO-3 partitions them."""
    from tests.conftest import tiny_overrides, write_teacher

    llm = [*tiny_overrides(data_dir), "strategy=freeze_depth", "strategy.num_trainable_blocks=2"]
    model, _ = build(compose(llm).model)
    layout = Layout.of(model.config)
    strategies.apply(model, compose(llm).strategy, layout)
    penalised = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and layout.locate(n).kind != "head"
    )
    text = data_dir / "text.txt"
    ewc = f"objectives=[{{name:ewc,args:{{source_path:{text}}}}},{{name:l2sp,weight:0.1}}]"
    for stage, ranks in ((2, 1), (3, 2)):
        planned = _plan([*llm, ewc, f"deepspeed=zero{stage}"])
        assert planned.counts.term_params == 3 * penalised
        assert planned.memory.terms == 3 * penalised * 4 // ranks  # fp32
    assert _plan(llm).memory.terms == 0

    teacher = write_teacher(tmp_path / "teacher", data_dir, labels=["neg", "pos"])
    cls = [*tiny_overrides(data_dir, task="classification"), "deepspeed=zero2"]
    distill = f"objectives=[{{name:distill,args:{{teacher:{teacher}}}}}]"
    from transformers import AutoModelForSequenceClassification

    size = sum(
        p.numel() for p in AutoModelForSequenceClassification.from_pretrained(teacher).parameters()
    )
    planned = _plan([*cls, distill])
    assert planned.counts.term_params == size and planned.memory.terms == 4 * size
    assert planned.memory.total == _plan(cls).memory.total + 4 * size


def test_loss_terms_trained_modules_count_as_trainable(data_dir) -> None:  # type: ignore[no-untyped-def]
    """A DANN classifier and multi-task heads train with the model (gradients, Adam
    states): the plan counts them as the real Objective does, shared backbone once."""
    from conf.schema import TermConfig
    from jobs import objectives, tasks
    from tests.conftest import tiny_overrides

    colors, prose, target = (
        data_dir / "colors.jsonl",
        data_dir / "prose.txt",
        data_dir / "target.jsonl",
    )
    terms = (
        f"objectives=[{{name:multitask,args:{{tasks:{{color:{{path:{colors}}},"
        f"prose:{{path:{prose},head:lm}}}}}}}},{{name:dann,args:{{target_path:{target}}}}}]"
    )
    llm = [*tiny_overrides(data_dir), "deepspeed=zero2"]
    cfg = compose([*llm, terms])
    model, tokenizer = build(cfg.model)
    context = objectives.Context(
        layout=Layout.of(model.config),
        task=tasks.get(cfg.model),
        zero_stage=2,
        pretrained=dict,
        tokenizer=tokenizer,
        data=cfg.data,
    )
    built = objectives.build([TermConfig(name=t.name, args=t.args) for t in cfg.objectives])
    real = objectives.Objective(model, context.task, built, context)
    unique = {id(p): p for p in real.parameters()}
    # (the plan gives a classification head 2 labels; colors has 6: 4 x 64 fewer weights)
    expected = sum(p.numel() for p in unique.values()) - 4 * 64
    planned, plain = _plan([*llm, terms]), _plan(llm)
    assert planned.counts.trainable == planned.counts.total == expected
    added = expected - plain.counts.trainable
    assert added > 64 * 200  # the LM head's own copy is most of it
    assert planned.memory.optimizer > plain.memory.optimizer


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny_t5", "data=wordnet_instruct", "strategy=lora"],
        [
            "model=tiny_t5",
            "data=wordnet_instruct",
            "strategy=freeze_depth",
            "strategy.num_trainable_blocks=2",
        ],
        [
            "model=tiny_clip",
            "data=image_folder",
            "data.path=/tmp/images",
            "strategy=feature_extraction",
        ],
    ],
)
def test_seq2seq_and_clip_plan_with_the_real_models_counts(overrides: list[str]) -> None:
    """A config-only T5 (no decoder start token in its config) and CLIP's vision tower
    trace on the meta device; the counts are the built model's under the strategy."""
    cfg = compose(overrides)
    counts, activations = plan.trace(cfg)
    model, _ = build(cfg.model, labels=["a", "b"] if "tiny_clip" in overrides[0] else None)
    model = strategies.apply(model, cfg.strategy, Layout.of(model.config))
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert activations.outside > 0  # (frozen blocks save nothing for a backward)
