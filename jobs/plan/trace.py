"""The model on the meta device: parameter counts under the strategy, and what one
forward pass saves for backward (traced with the kernels training uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conf.schema import FinetuneConfig, StrategyConfig
from jobs import strategies, tasks
from jobs.memory import SavedActivations
from jobs.models import Layout, byte_tokenizer, hf_config, hidden_size, model_class


# --------------------------------------------------------------------------- the model
def labels_for(cfg: FinetuneConfig) -> list[str] | None:
    """Classification labels as the planner sees them (no data file is read): the
    configured label set, else data.num_classes placeholders, else 2."""
    if not tasks.get(cfg.model).new_head:
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
    # Frozen parameters the loss terms attach (L2-SP's references, EWC's references
    # and Fisher, a distillation teacher): stored like the model's, no gradients.
    term_params: int = 0

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


def term_parameters(cfg: FinetuneConfig, model: Any, layout: Any) -> int:
    """What the loss terms add as frozen parameters (jobs/objectives): a copy of every
    trained pretrained weight outside the heads for L2-SP, two for EWC (the reference
    and F), the whole teacher for distillation (its config, on the meta device)."""
    penalised = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" not in name and layout.locate(name).kind != "head"
    )
    extra = 0
    for term in cfg.objectives:
        if term.name == "l2sp":
            extra += penalised
        elif term.name == "ewc":
            extra += 2 * penalised
        elif term.name == "distill" and term.args.get("teacher"):
            extra += _teacher_parameters(cfg, str(term.args["teacher"]))
    return extra


def term_modules(cfg: FinetuneConfig, model: Any, layout: Any) -> int:
    """The trainable parameters the loss terms add (a DANN domain classifier, multi-task
    heads; not what they share with the model), their modules built on the meta device
    (a classification head with 2 labels: the label sets are not read here)."""
    from jobs import objectives

    own = [t for t in objectives.build(cfg.objectives) if getattr(t, "trains_module", False)]
    if not own:
        return 0
    context = objectives.Context(
        layout=layout,
        task=tasks.get(cfg.model),
        zero_stage=cfg.deepspeed.stage,
        pretrained=lambda: {},
    )
    shared = {id(p) for p in model.parameters()}
    count = 0
    with torch.device("meta"):
        for term in own:
            module: Any = term.attach(model, context)
            count += sum(int(p.numel()) for p in module.parameters() if id(p) not in shared)
    return count


def _teacher_parameters(cfg: FinetuneConfig, teacher: str) -> int:
    from transformers import AutoConfig

    from jobs.objectives import distill

    where = distill.teacher_dir(teacher, key="objectives.distill.args.teacher")
    if (where / "adapter_config.json").is_file():  # merged into its base on load
        where = Path(
            json.loads((where / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    config = AutoConfig.from_pretrained(where)
    auto = tasks.get(cfg.model).auto_class(config, distill.labels_of(config))
    with torch.device("meta"):
        teacher_model = auto.from_config(config)
    return sum(p.numel() for p in teacher_model.parameters())


def trace(cfg: FinetuneConfig, seq_len: int | None = None) -> tuple[Counts, Activations]:
    """Counts and activations of ``cfg``'s model under its strategy, on the meta device."""
    seq_len = seq_len or tasks.get(cfg.model).input_size(cfg.model, cfg.data)
    model, layout, blocks = _meta_model(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    model = strategies.apply(model, cfg.strategy, layout)
    # The terms' own modules train with the model (gradients, optimizer states).
    added = term_modules(cfg, model, layout)
    total = sum(p.numel() for p in model.parameters()) + added
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + added
    config: Any = model.config
    counts = Counts(
        total=total,
        trainable=trainable,
        largest_layer=largest,
        quantized=_quantized(model, cfg.strategy),
        num_blocks=layout.num_blocks,
        hidden=hidden_size(config),
        context=getattr(config, "max_position_embeddings", None),
        term_params=term_parameters(cfg, model, layout),
    )
    # No attention mask: an all-ones mask is skipped anyway (and checking that needs
    # real values). Padded batches add one boolean mask, negligible beside the rest.
    # Batch norm cannot train on one example: trace two and halve (activations are linear
    # in the batch).
    task = tasks.get(cfg.model)
    rows = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    batch = task.example_batch(
        batch_size=rows,
        seq_len=seq_len,
        vocab=1,
        num_labels=len(labels_for(cfg) or []),
        device="meta",
    )
    model.train()
    with _as_trained(cfg.deepspeed.stage), SavedActivations(model, blocks) as saved:
        model(**batch)
    act_bytes = torch.finfo(_compute_dtype(cfg)).bits // 8
    return counts, Activations(
        seq_len=seq_len,
        outside=saved.outside // rows,
        per_block=tuple(b // rows for b in saved.per_block),
        boundary=max(saved.boundaries, default=seq_len * counts.hidden * act_bytes * rows) // rows,
    )
