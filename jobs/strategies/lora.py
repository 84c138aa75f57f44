"""lora: low-rank adapters (peft) on the attention projections; a new head trains fully.

    graft finetune strategy=lora strategy.lora.r=16 [strategy.num_trainable_blocks=2]

With ``num_trainable_blocks=k`` only the top k blocks get adapters.
"""

from __future__ import annotations

import re

from torch import nn

from conf.schema import StrategyConfig
from jobs.models.families import Layout


def target_regex(layout: Layout, targets: list[str] | tuple[str, ...], k: int | None) -> str:
    """A peft target_modules regex: the ``targets`` leaf modules inside the top k blocks."""
    blocks = []
    offset = 0
    for path, count in zip(layout.family.blocks, layout.blocks_per_list, strict=True):
        wanted = [i for i in range(count) if k is None or layout.num_blocks - 1 - (offset + i) < k]
        if wanted:
            blocks.append(rf"{re.escape(path)}\.({'|'.join(map(str, wanted))})")
        offset += count
    if not blocks:
        raise ValueError(
            "strategy.num_trainable_blocks: 0 blocks leaves LoRA nothing to adapt; use >= 1"
        )
    return rf"(.*\.)?({'|'.join(blocks)})\..*\.({'|'.join(map(re.escape, targets))})"


# peft's task type by the model class's suffix; an image classifier has none (a plain
# PeftModel that forwards pixel_values; the head is kept by modules_to_save). By name:
# peft is imported only by a run that uses LoRA (~0.4 s of every process's start).
_TASK_TYPES = {
    "SequenceClassification": "SEQ_CLS",
    "CausalLM": "CAUSAL_LM",
    "ConditionalGeneration": "SEQ_2_SEQ_LM",  # T5, BART
}


def _leaf_names(model: nn.Module, paths: tuple[str, ...]) -> list[str]:
    modules = dict(model.named_modules())
    return [p.rsplit(".", 1)[-1] for p in paths if p in modules]


def apply(model: nn.Module, cfg: StrategyConfig, layout: Layout) -> nn.Module:
    import peft

    # A classifier (text or image) has a new head; a causal LM's head is pretrained.
    kind = type(model).__name__
    is_classifier = kind.endswith(("ForSequenceClassification", "ForImageClassification"))
    # New heads (and embeddings, if asked) train in full and are saved with the adapter.
    modules_to_save = _leaf_names(model, layout.family.heads) if is_classifier else []
    if cfg.train_embeddings:
        modules_to_save += _leaf_names(model, layout.family.embeddings)
    lora_config = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_regex(
            layout, cfg.lora.target_modules or layout.family.lora_targets, cfg.num_trainable_blocks
        ),
        modules_to_save=modules_to_save or None,
        task_type=(
            getattr(peft.TaskType, task)
            if (task := _TASK_TYPES.get(kind.rsplit("For", 1)[-1]))
            else None
        ),
        use_dora=cfg.lora.variant == "dora",
        use_rslora=cfg.lora.variant == "rslora",
    )
    return peft.get_peft_model(model, lora_config)
