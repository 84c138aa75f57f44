"""`graft plan`: will this config fit, and how, before any GPU is taken.

    graft plan model=llama3_8b data=jsonl data.task=instruction data.path=x.jsonl \
        data.max_length=2048 strategy=lora deepspeed=zero3 --num-gpus 8 --gpu-memory 80GiB
    graft plan [overrides] --recommend      # the cheapest overrides that fit

The model is built on the meta device from its config (no weights are read, so a 70B
config plans in seconds), the strategy is applied to it (frozen layers, LoRA adapters),
and one forward pass runs on meta tensors while ``jobs.memory.SavedActivations`` adds up
what autograd keeps for backward. Per device it reports:

  parameters, gradients, optimizer states   by ZeRO stage, offload, precision, and the
                                            trainable/frozen split (``model_states``)
  buffers                                   ZeRO's communication buckets, ZeRO-3's
                                            gathered layer
  activations                               at the micro batch and sequence length,
                                            without and with activation checkpointing

The model-state accounting is DeepSpeed's: with bf16 the ZeRO-2 and ZeRO-3 figures are
those of DeepSpeed's estimators (ZeRO-3 adds the 16-bit parameter partition they leave
out); the fp32 accounting follows what DeepSpeed allocates on the CPU, checked against
measured runs (``jobs.memprobe``). Compatibility checks give a verdict and a reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from conf.schema import ConfigError, FinetuneConfig, StrategyConfig
from jobs import strategies
from jobs.engine import bucket_sizes, global_batch_size
from jobs.memory import SavedActivations
from jobs.models import Layout, byte_tokenizer, hf_config, hidden_size, model_class

GiB = 2**30
# QLoRA's nf4 weights: 4 bits plus one fp32 absmax per 64 weights, itself quantized to
# 8 bits with a second-level constant per 256 blocks (double quantization).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Adam keeps two fp32 moments per trainable parameter.
ADAM_BYTES = 8


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '24 GiB', '1.5TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError("--gpu-memory", f"{text!r} is not a size like 80GiB, 40GB or 24GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def fmt(nbytes: float) -> str:
    return f"{nbytes / GiB:,.2f} GiB" if nbytes >= GiB / 100 else f"{nbytes / 2**20:,.2f} MiB"


# --------------------------------------------------------------------------- the model
def labels_for(cfg: FinetuneConfig) -> list[str] | None:
    """Classification labels as the planner sees them (no data file is read): the
    configured label set, else data.num_classes placeholders, else 2."""
    if cfg.model.task != "sequence_classification":
        return None
    if cfg.data.labels:
        return list(cfg.data.labels)
    return [f"class_{i}" for i in range(cfg.data.num_classes or 2)]


def block_modules(model: nn.Module, layout: Layout) -> list[nn.Module]:
    """The model's blocks, bottom to top (peft-wrapped or not)."""
    blocks: list[nn.Module] = []
    for path in layout.family.blocks:
        blocks.extend(model.get_submodule(path).children())
    return blocks


@dataclass(frozen=True)
class Counts:
    """Parameter counts after the strategy is applied."""

    total: int
    trainable: int
    # DeepSpeed's "largest layer": the most parameters one module holds itself.
    largest_layer: int
    # Frozen parameters stored 4-bit (QLoRA's base linear weights).
    quantized: int
    num_blocks: int
    hidden: int
    context: int | None

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass(frozen=True)
class Activations:
    """What one forward pass saves for backward, for one sequence (micro batch 1)."""

    seq_len: int
    outside: int  # embeddings, head, loss
    per_block: tuple[int, ...]
    boundary: int  # one block's input (the hidden states), kept per block when checkpointing

    def bytes(self, micro_batch: int, checkpointing: bool) -> int:
        if not checkpointing:
            return micro_batch * (self.outside + sum(self.per_block))
        # Each block keeps only its input; backward recomputes one block at a time.
        saving = [b for b in self.per_block if b]
        kept = len(saving) * self.boundary + (max(saving) if saving else 0)
        return micro_batch * (self.outside + kept)


def _compute_dtype(cfg: FinetuneConfig) -> torch.dtype:
    # DeepSpeed casts the model to bf16 when bf16 is on, whatever model.dtype says.
    return torch.bfloat16 if cfg.deepspeed.bf16 else getattr(torch, cfg.model.dtype)


def _meta_model(cfg: FinetuneConfig) -> tuple[nn.Module, Layout, list[nn.Module]]:
    tokenizer = byte_tokenizer() if cfg.model.tokenizer == "bytes" else None
    config = hf_config(cfg.model, tokenizer)
    auto = model_class(cfg.model, config, labels_for(cfg))
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    with torch.device("meta"):
        model = auto.from_config(config, dtype=_compute_dtype(cfg))
    layout = Layout.of(model.config)
    return model, layout, block_modules(model, layout)


def _quantized(model: nn.Module, strategy: StrategyConfig) -> int:
    """QLoRA quantizes the frozen Linear weights inside the blocks (not embeddings/head)."""
    if strategy.name != "lora" or not strategy.lora.quantize:
        return 0
    return sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and ".layers." in f".{name}."
    )


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _flash_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA as a fused (flash) kernel saves it: q, k, v, the output and its logsumexp.
    On meta tensors torch falls back to the unfused math path, which saves the full
    attention matrix; the GPU and CPU kernels graft runs on do not."""
    if query.device.type != "meta" or attn_mask is not None or dropout_p:
        return _sdpa(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, is_causal=is_causal, scale=scale
    )
    return out


class _Zero3Linear(torch.autograd.Function):
    """What ZeRO-3 puts in place of F.linear (DeepSpeed's memory-efficient linear): it
    saves its input even when the weight is frozen, so frozen layers keep activations."""

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        out = input.matmul(weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the trace has no backward
        raise NotImplementedError


@contextmanager
def _as_trained(stage: int) -> Iterator[None]:
    """Swap in the kernels training uses for the ones meta tensors would get."""
    functional = torch.nn.functional
    saved = functional.scaled_dot_product_attention, functional.linear
    functional.scaled_dot_product_attention = _flash_sdpa
    if stage == 3:
        functional.linear = _Zero3Linear.apply
    try:
        yield
    finally:
        functional.scaled_dot_product_attention, functional.linear = saved


def trace(cfg: FinetuneConfig, seq_len: int | None = None) -> tuple[Counts, Activations]:
    """Counts and activations of ``cfg``'s model under its strategy, on the meta device."""
    seq_len = seq_len or cfg.data.max_length
    model, layout, blocks = _meta_model(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    model = strategies.apply(model, cfg.strategy, layout)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config: Any = model.config
    counts = Counts(
        total=total,
        trainable=trainable,
        largest_layer=largest,
        quantized=_quantized(model, cfg.strategy),
        num_blocks=layout.num_blocks,
        hidden=hidden_size(config),
        context=getattr(config, "max_position_embeddings", None),
    )
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    # No attention mask: an all-ones mask is skipped anyway (and checking that needs
    # real values). Padded batches add one boolean mask, negligible beside the rest.
    batch: dict[str, torch.Tensor] = {"input_ids": ids}
    batch["labels"] = torch.zeros(1, dtype=torch.long, device="meta") if labels_for(cfg) else ids
    model.train()
    with _as_trained(cfg.deepspeed.stage), SavedActivations(model, blocks) as saved:
        model(**batch)
    act_bytes = torch.finfo(_compute_dtype(cfg)).bits // 8
    return counts, Activations(
        seq_len=seq_len,
        outside=saved.outside,
        per_block=tuple(saved.per_block),
        boundary=seq_len * counts.hidden * act_bytes,
    )


# --------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Memory:
    """Bytes per device (GPU); ``host`` is what offload puts in CPU memory per rank."""

    params: int
    grads: int
    optimizer: int
    gathered: int  # ZeRO-3: one layer's parameters and gradients gathered whole
    buckets: int  # ZeRO-1/2/3: the gradient reduce bucket
    activations: int
    host: int = 0

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def buffers(self) -> int:
        return self.gathered + self.buckets

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations


def model_states(
    counts: Counts,
    *,
    stage: int,
    world: int,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> Memory:
    """Per-rank parameters, gradients and optimizer states, plus ZeRO's buffers.

    P = all parameters, T = trainable, N = data-parallel ranks, L = the largest layer.
    Frozen parameters have no gradients or optimizer states; ZeRO-1/2 keep them whole on
    every rank, ZeRO-3 partitions them like the rest. Adam: two fp32 moments (8 bytes).
      bf16 (16-bit params, fp32 master weights):
        ZeRO-0    2P   + 2T        + 12T     DeepSpeed's bf16 wrapper (measured)
        ZeRO-1/2  2P   + 6T/N      + 12T/N   = DeepSpeed's estimate 2P + 18T/N for T = P
        ZeRO-3    2P/N + 4T/N      + 12T/N   = DeepSpeed's estimate 18P/N for T = P,
                  + 4L gathered (16-bit params and grads of one layer)
      fp32 (no master copy at ZeRO-0; ZeRO-1/2/3 keep an fp32 partition of their own):
        ZeRO-0    4P   + 4T        + 8T
        ZeRO-1/2  4P   + 4T/N      + 12T/N   (this DeepSpeed partitions ZeRO-1's grads too)
        ZeRO-3    4P/N + 4T/N      + 12T/N   + 8L gathered
    ZeRO-1/2/3 add one reduce bucket (``engine.bucket_sizes``) of gradients.
    Optimizer offload moves gradients, master weights and moments to host memory (the
    device keeps 2P at ZeRO-2, 2P/N at ZeRO-3, as DeepSpeed estimates); parameter
    offload (ZeRO-3) moves the parameter partition too.
    """
    P, T, L, N = counts.total, counts.trainable, counts.largest_layer, world
    pbytes = 2 if bf16 else 4
    # QLoRA's quantized weights are stored at ~4.1 bits instead of 16.
    stored = P * pbytes - counts.quantized * (pbytes - NF4_BYTES_PER_PARAM)
    params = int(stored if stage < 3 else stored / N)
    if stage == 0:
        grads = pbytes * T
        optimizer = (ADAM_BYTES + (4 if bf16 else 0)) * T
    else:
        grads = ((6 if bf16 and stage < 3 else 4) * T) // N
        optimizer = (4 + ADAM_BYTES) * T // N
    buckets = bucket_sizes(counts.hidden)["reduce_bucket_size"] * pbytes if stage else 0
    gathered = 2 * pbytes * L if stage == 3 else 0
    host = 0
    if offload_optimizer and stage >= 1:
        host, grads, optimizer = grads + optimizer, 0, 0
    if offload_params and stage == 3:
        host, params = host + params, 0
    return Memory(params, grads, optimizer, gathered, buckets, 0, host)


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    level: str  # "ok" | "warn" | "error"
    key: str
    message: str


@dataclass
class Plan:
    cfg: FinetuneConfig
    world: int
    device_bytes: int | None
    counts: Counts
    activations: Activations
    memory: Memory
    memory_checkpointed: int  # total with activation checkpointing on
    checks: list[Check] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.memory.total <= self.device_bytes

    @property
    def ok(self) -> bool:
        return not any(c.level == "error" for c in self.checks) and self.fits is not False


def _config_checks(cfg: FinetuneConfig) -> list[Check]:
    checks = []
    for group in (cfg.model, cfg.strategy, cfg.deepspeed, cfg.train, cfg.scaling):
        try:
            group.check()
        except ConfigError as e:
            checks.append(Check("error", e.key, str(e).split(": ", 1)[1]))
    return checks


def compatibility(
    cfg: FinetuneConfig, counts: Counts, *, world: int, num_gpus: int | None
) -> list[Check]:
    """Verdicts on combinations that fail, or work worse than users expect."""
    checks = _config_checks(cfg)
    ds, strategy = cfg.deepspeed, cfg.strategy
    lora = strategy.name == "lora"
    frozen = counts.frozen > 0

    if ds.stage == 3 and (frozen or lora):
        what = "LoRA adapters" if lora else f"{counts.frozen:,} frozen parameters"
        checks.append(
            Check(
                "ok",
                "deepspeed.stage",
                f"ZeRO-3 with {what}: frozen weights are partitioned too; the export gathers "
                "the 16-bit weights on rank 0 (stage3_gather_16bit_weights_on_model_save)",
            )
        )
        if lora and cfg.run.export_merged:
            full = counts.total * 2
            checks.append(
                Check(
                    "warn",
                    "run.export_merged",
                    f"merging LoRA under ZeRO-3 reloads the full base model on rank 0's host "
                    f"({fmt(full)} in 16-bit) after training; export the adapter only "
                    "(run.export_merged=false) if the host is short of memory",
                )
            )
    if lora and strategy.lora.quantize:
        if ds.stage == 3:
            checks.append(
                Check(
                    "error",
                    "strategy.lora.quantize",
                    "QLoRA x ZeRO-3: 4-bit weights cannot be partitioned unless bitsandbytes "
                    "stores them in a 16-bit container (bnb_4bit_quant_storage), which graft "
                    "does not set; use deepspeed=zero2 (the base is frozen, so ZeRO-2 already "
                    "shards everything that trains)",
                )
            )
        if ds.offload_params:
            checks.append(
                Check(
                    "error",
                    "deepspeed.offload_params",
                    "QLoRA x parameter offload: quantized weights cannot be offloaded; "
                    "allowed: deepspeed.offload_params=false",
                )
            )
        if not (num_gpus or cfg.scaling.gpus_per_worker):
            checks.append(
                Check(
                    "error",
                    "strategy.lora.quantize",
                    "QLoRA needs CUDA GPUs (bitsandbytes 4-bit kernels); this plan has none",
                )
            )
    if ds.offload_optimizer:
        checks.append(
            Check(
                "warn",
                "deepspeed.offload_optimizer",
                "offload runs graft's torch AdamW on the CPU (zero_force_ds_cpu_optimizer is "
                "off so discriminative parameter groups keep working): correct, but several "
                "times slower per step than DeepSpeedCPUAdam; use it only when it must fit",
            )
        )
    if ds.offload_params and not ds.offload_optimizer:
        checks.append(
            Check(
                "warn",
                "deepspeed.offload_params",
                "parameter offload without optimizer offload keeps the optimizer on the GPU "
                "while parameters stream over PCIe every step; offload the optimizer first",
            )
        )
    if counts.context is not None and cfg.data.max_length > counts.context:
        checks.append(
            Check(
                "error",
                "data.max_length",
                f"{cfg.data.max_length} tokens is more than the model's context "
                f"({counts.context}, max_position_embeddings); allowed: 1..{counts.context}",
            )
        )
    configured = cfg.scaling.num_workers * max(cfg.scaling.gpus_per_worker, 1)
    if num_gpus is not None:
        if not cfg.scaling.gpus_per_worker:
            checks.append(
                Check(
                    "warn",
                    "scaling.gpus_per_worker",
                    f"planned for {num_gpus} GPUs, but scaling/ asks for CPU workers "
                    f"(gpus_per_worker=0); to run it: scaling.num_workers={num_gpus} "
                    "scaling.gpus_per_worker=1 (or scaling=gpu8)",
                )
            )
        elif num_gpus != configured:
            checks.append(
                Check(
                    "warn",
                    "scaling.num_workers",
                    f"--num-gpus {num_gpus} but scaling/ gives {configured} "
                    f"({cfg.scaling.num_workers} workers x {cfg.scaling.gpus_per_worker} GPUs); "
                    f"the plan uses {num_gpus}",
                )
            )
    if world != cfg.scaling.num_workers:
        wanted = global_batch_size(cfg.train, cfg.scaling.num_workers)
        per_step = cfg.train.micro_batch_size * world
        if wanted % per_step:
            checks.append(
                Check(
                    "warn",
                    "train.grad_accum_steps",
                    f"the configured global batch {wanted} (micro batch "
                    f"{cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x "
                    f"{cfg.scaling.num_workers} workers) is not divisible by micro batch x "
                    f"{world} ranks = {per_step}; pick train.micro_batch_size so that "
                    f"{wanted} / ({world} x micro batch) is whole",
                )
            )
        else:
            checks.append(
                Check(
                    "ok",
                    "train.grad_accum_steps",
                    f"to keep the global batch {wanted} on {world} ranks: "
                    f"train.grad_accum_steps={wanted // per_step}",
                )
            )
    return checks


# --------------------------------------------------------------------------- plan
def estimate(
    cfg: FinetuneConfig,
    *,
    num_gpus: int | None = None,
    device_bytes: int | None = None,
    traced: tuple[Counts, Activations] | None = None,
) -> Plan:
    """The per-device memory of ``cfg`` on ``num_gpus`` ranks (default: scaling/)."""
    world = num_gpus or cfg.scaling.num_workers
    counts, acts = traced or trace(cfg)
    ds = cfg.deepspeed
    states = model_states(
        counts,
        stage=ds.stage,
        world=world,
        bf16=ds.bf16,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
    )
    mb, ckpt = cfg.train.micro_batch_size, cfg.model.activation_checkpointing
    memory = dataclasses.replace(states, activations=acts.bytes(mb, ckpt))
    with_ckpt = states.total + acts.bytes(mb, True)
    plan = Plan(cfg, world, device_bytes, counts, acts, memory, with_ckpt)
    plan.checks = compatibility(cfg, counts, world=world, num_gpus=num_gpus)
    if device_bytes is not None and memory.total > device_bytes:
        plan.checks.append(
            Check(
                "error",
                "memory",
                f"needs {fmt(memory.total)} per device, more than the {fmt(device_bytes)} "
                "given; see `graft plan ... --recommend`",
            )
        )
    return plan


# --------------------------------------------------------------------------- recommend
@dataclass(frozen=True)
class Option:
    """One candidate configuration: its overrides, its cost and its memory."""

    overrides: tuple[str, ...]
    cost: float
    total: int


# Relative step-time penalties (rough, from DeepSpeed's docs and common measurements):
# ZeRO-2/3 add communication, offload moves states over PCIe and runs Adam on the CPU,
# checkpointing recomputes the forward (~1/3 of a step), smaller micro batches use
# the GPU less well. Changing what trains (LoRA, freezing) changes the result, so it
# comes last.
_STAGE_COST = {0: 0.0, 1: 0.02, 2: 0.05, 3: 0.2}
_OFFLOAD_COST = {(False, False): 0.0, (True, False): 1.0, (True, True): 2.5}
_CKPT_COST = 0.33
_HALVING_COST = 0.1
_STRATEGY_COST = 3.0


def _strategy_variants(
    cfg: FinetuneConfig, num_blocks: int
) -> list[tuple[StrategyConfig, tuple[str, ...]]]:
    """The configured strategy, then LoRA and freeze-depth alternatives (if it trains more)."""
    variants: list[tuple[StrategyConfig, tuple[str, ...]]] = [(cfg.strategy, ())]
    if cfg.strategy.name != "lora":
        lora = replace(cfg.strategy, name="lora", num_trainable_blocks=None)
        variants.append((lora, ("strategy=lora", f"strategy.lora.r={lora.lora.r}")))
    if cfg.strategy.name in ("full", "freeze_depth"):
        current = cfg.strategy.num_trainable_blocks or num_blocks
        for k in sorted({max(1, num_blocks // 4), max(1, num_blocks // 2)}):
            if k < current:
                frozen = replace(cfg.strategy, name="freeze_depth", num_trainable_blocks=k)
                variants.append(
                    (frozen, ("strategy=freeze_depth", f"strategy.num_trainable_blocks={k}"))
                )
    return variants


def recommend(
    cfg: FinetuneConfig, *, num_gpus: int | None, device_bytes: int, limit: int = 5
) -> list[Option]:
    """The cheapest configurations that fit ``device_bytes`` per device, cheapest first."""
    world = num_gpus or cfg.scaling.num_workers
    base_counts, _ = trace(cfg, seq_len=8)
    options: list[Option] = []
    mb0, accum0 = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    micro_batches = [mb0 // 2**i for i in range(int(math.log2(mb0)) + 1)]
    for strategy, strategy_overrides in _strategy_variants(cfg, base_counts.num_blocks):
        variant = replace(cfg, strategy=strategy)
        counts, acts = trace(variant)
        for stage, (off_opt, off_par), ckpt, mb in itertools.product(
            (0, 1, 2, 3), _OFFLOAD_COST, (False, True), micro_batches
        ):
            if (off_opt and stage == 0) or (off_par and stage != 3):
                continue
            if strategy.lora.quantize and (stage == 3 or off_par):
                continue
            states = model_states(
                counts,
                stage=stage,
                world=world,
                bf16=cfg.deepspeed.bf16,
                offload_optimizer=off_opt,
                offload_params=off_par,
            )
            total = states.total + acts.bytes(mb, ckpt)
            if total > device_bytes:
                continue
            halvings = int(math.log2(mb0 // mb))
            cost = (
                _STAGE_COST[stage]
                + _OFFLOAD_COST[(off_opt, off_par)]
                + (_CKPT_COST if ckpt else 0.0)
                + _HALVING_COST * halvings
                + (_STRATEGY_COST if strategy_overrides else 0.0)
            )
            overrides = [*strategy_overrides, f"deepspeed=zero{stage}"]
            if off_opt:
                overrides.append("deepspeed.offload_optimizer=true")
            if off_par:
                overrides.append("deepspeed.offload_params=true")
            if ckpt:
                overrides.append("model.activation_checkpointing=true")
            if mb != mb0:
                overrides += [
                    f"train.micro_batch_size={mb}",
                    f"train.grad_accum_steps={accum0 * mb0 // mb}",
                ]
            options.append(Option(tuple(overrides), cost, total))
    options.sort(key=lambda o: (o.cost, o.total))
    return options[:limit]


# --------------------------------------------------------------------------- output
def _rows(plan: Plan) -> list[tuple[str, int]]:
    m = plan.memory
    ckpt = "with" if plan.cfg.model.activation_checkpointing else "without"
    rows = [
        ("parameters", m.params),
        ("gradients", m.grads),
        ("optimizer states", m.optimizer),
    ]
    if m.gathered:
        rows.append(("gathered layer (ZeRO-3)", m.gathered))
    if m.buckets:
        rows.append(("reduce bucket", m.buckets))
    rows.append((f"activations ({ckpt} checkpointing)", m.activations))
    return rows


def to_dict(plan: Plan, options: list[Option] | None = None) -> dict[str, Any]:
    c, m = plan.counts, plan.memory
    return {
        "model": plan.cfg.model.name,
        "strategy": plan.cfg.strategy.name,
        "zero_stage": plan.cfg.deepspeed.stage,
        "bf16": plan.cfg.deepspeed.bf16,
        "world_size": plan.world,
        "micro_batch_size": plan.cfg.train.micro_batch_size,
        "seq_len": plan.activations.seq_len,
        "params": {"total": c.total, "trainable": c.trainable, "largest_layer": c.largest_layer},
        "memory_bytes": {
            **dataclasses.asdict(m),
            "model_states": m.model_states,
            "total": m.total,
            "total_with_checkpointing": plan.memory_checkpointed,
        },
        "device_bytes": plan.device_bytes,
        "fits": plan.fits,
        "ok": plan.ok,
        "checks": [dataclasses.asdict(ch) for ch in plan.checks],
        "recommend": [dataclasses.asdict(o) for o in options or []],
    }


def render(
    plan: Plan,
    console: Any,
    *,
    options: list[Option] | None = None,
    overrides: Sequence[str] = (),
) -> None:
    """The plan as rich tables: memory per device, checks, and (--recommend) options."""
    from rich.table import Table

    cfg, c, m = plan.cfg, plan.counts, plan.memory
    share = c.trainable / c.total if c.total else 0.0
    precision = "bf16" if cfg.deepspeed.bf16 else cfg.model.dtype
    offload = [
        name
        for name, on in (
            ("optimizer", cfg.deepspeed.offload_optimizer),
            ("params", cfg.deepspeed.offload_params),
        )
        if on
    ]
    console.print(
        f"graft plan: {cfg.model.name} ({_count(c.total)} parameters, {c.num_blocks} blocks), "
        f"strategy {cfg.strategy.name}: {c.trainable:,} trainable ({share:.2%}); "
        f"ZeRO-{cfg.deepspeed.stage}{' + offload ' + '/'.join(offload) if offload else ''}, "
        f"{precision}, {plan.world} ranks, micro batch {cfg.train.micro_batch_size} x "
        f"{plan.activations.seq_len} tokens"
    )
    table = Table(title="memory per device", title_justify="left")
    table.add_column("")
    table.add_column("size", justify="right")
    for label, nbytes in _rows(plan):
        table.add_row(label, fmt(nbytes))
    table.add_row("[bold]total[/bold]", f"[bold]{fmt(m.total)}[/bold]")
    console.print(table)
    if plan.device_bytes is not None:
        verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
        console.print(
            f"{verdict}: {fmt(m.total)} of {fmt(plan.device_bytes)} per device "
            f"({m.total / plan.device_bytes:.0%})"
        )
    other = "on" if not cfg.model.activation_checkpointing else "off"
    alt = (
        plan.memory_checkpointed
        if other == "on"
        else m.model_states + m.buffers + plan.activations.bytes(cfg.train.micro_batch_size, False)
    )
    console.print(f"with activation checkpointing {other}: {fmt(alt)} per device")
    if m.host:
        console.print(f"host (CPU) memory for offloaded states: {fmt(m.host)} per rank")
    styles = {"ok": "green", "warn": "yellow", "error": "red"}
    for check in plan.checks:
        style = styles[check.level]
        console.print(f"[{style}]{check.level:5}[/{style}] {check.key}: {check.message}")
    if options is None:
        return
    if not options:
        console.print(
            f"[red]no configuration fits {fmt(plan.device_bytes or 0)} per device[/red] on "
            f"{plan.world} ranks (tried ZeRO 0-3, offload, checkpointing, smaller micro batches, "
            "LoRA and freezing); add GPUs (--num-gpus) or shorten data.max_length"
        )
        return
    table = Table(title="cheapest configurations that fit (--recommend)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("overrides")
    table.add_column("per device", justify="right")
    table.add_column("cost", justify="right")
    for i, option in enumerate(options, 1):
        table.add_row(
            str(i),
            " ".join(option.overrides) or "(as configured)",
            fmt(option.total),
            f"{option.cost:.2f}",
        )
    console.print(table)
    console.print(
        "cost: rough relative slowdown (ZeRO-3 0.2, optimizer offload 1, parameter offload "
        "+1.5, checkpointing 0.33, each micro-batch halving 0.1, changing what trains 3)"
    )
    console.print(f"paste: graft finetune {' '.join(merge(overrides, options[0].overrides))}")


def merge(overrides: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``overrides`` then ``extra``, dropping the overrides ``extra`` sets again (Hydra
    refuses two values for one key)."""

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    replaced = {key(o) for o in extra}
    return [o for o in overrides if key(o) not in replaced] + list(extra)
