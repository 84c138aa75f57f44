"""Export in Hugging Face format: the full model, or the PEFT adapter (+ merged model).

Collective: every rank calls ``export`` (under ZeRO-3 the weights are gathered from all
ranks); rank 0 writes ``<run>/export``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conf.schema import FinetuneConfig
from jobs import card, objectives
from jobs.models import build, weights_dir

if TYPE_CHECKING:
    import peft


def is_adapter(module: Any) -> bool:
    """A peft model (peft is imported only by runs that use it: none can exist before)."""
    loaded = sys.modules.get("peft")
    return loaded is not None and isinstance(module, loaded.PeftModel)


def full_state_dict(engine: Any, *, terms: bool = False) -> dict[str, Any] | None:
    """The model's whole state dict on rank 0 (None elsewhere), gathered under ZeRO-3;
    loss terms' modules (an L2-SP reference, ...) are left out unless ``terms``."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if engine.global_rank == 0 else None
    if state is not None and isinstance(engine.module, objectives.Objective) and not terms:
        state = objectives.model_state_dict(state)
    return state


def export(
    engine: Any,
    tokenizer: Any,
    cfg: FinetuneConfig,
    export_dir: Path,
    *,
    labels: list[str] | None,
    metrics: dict[str, Any] | None = None,
) -> None:
    whole = full_state_dict(engine, terms=True)  # (collective under ZeRO-3)
    if engine.global_rank != 0:
        return
    assert whole is not None
    wrapped = isinstance(engine.module, objectives.Objective)
    state_dict = objectives.model_state_dict(whole) if wrapped else whole
    if export_dir.exists():
        shutil.rmtree(export_dir)
    module: Any = objectives.unwrap(engine.module)
    terms = [t for t in engine.module.loss_terms if hasattr(t, "export")] if wrapped else []
    plain = state_dict  # the bare model's weights by plain names (LoRA merged in)
    if is_adapter(module):
        merged = _export_adapter(
            module, state_dict, cfg, export_dir, labels=labels, merge=bool(terms)
        )
        plain = merged.state_dict() if merged is not None else {}
    else:
        # (transformers empties the dict it is given as it writes: hand it a copy)
        module.save_pretrained(export_dir, state_dict=dict(state_dict))
        tokenizer.save_pretrained(export_dir)
    for sub in ("adapter", "merged", "base"):
        if (export_dir / sub).is_dir():
            tokenizer.save_pretrained(export_dir / sub)
    if labels is not None:
        (export_dir / "labels.json").write_text(json.dumps(labels))
    for term in terms:  # a term's own models (multi-task heads)
        term.export(whole, plain, export_dir, tokenizer)
    base = cfg.model.path or cfg.model.package or cfg.model.name
    card.write(
        export_dir,
        cfg,
        metrics=metrics or {},
        base=str(base),
        labels=labels,
        adapter=is_adapter(module),
    )


def _export_adapter(
    module: peft.PeftModel,
    state_dict: dict[str, Any],
    cfg: FinetuneConfig,
    export_dir: Path,
    *,
    labels: list[str] | None,
    merge: bool = False,
) -> Any:
    """The adapter (and the base it trained on when no weights are on disk), and with
    run.export_merged the merged model; returns the merged model when ``merge`` or
    export_merged asked for it (None otherwise)."""
    adapter_dir = export_dir / "adapter"
    if cfg.model.arch is not None or not cfg.model.pretrained:
        # No weights on disk to attach the adapter to: save the (frozen) base it trained on.
        base_dir = export_dir / "base"
        base, _ = build(cfg.model, labels=labels, seed=cfg.train.seed)
        base.save_pretrained(base_dir)
        base_path = str(base_dir.resolve())
    else:
        base_path = weights_dir(cfg.model)
    module.peft_config["default"].base_model_name_or_path = base_path
    module.save_pretrained(str(adapter_dir), state_dict=state_dict)
    if not (cfg.run.export_merged or merge):
        return None
    import peft

    base, _ = build(cfg.model, labels=labels, seed=cfg.train.seed)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if cfg.run.export_merged:
        merged.save_pretrained(export_dir / "merged")
    return merged
