"""The model card (README.md) written into every export, through huggingface_hub's
``ModelCard``: what the model is (base, task, strategy), what it was trained on, how
well it does (the run's final and test metrics), and how to make it again."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from conf.schema import FinetuneConfig

COMMAND = "command.txt"  # <run>/command.txt: the command line that started the run


def record_command(run_dir: Path, argv: list[str] | None = None) -> None:
    """The driver's command line, for the card (the workers do not see it)."""
    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name in ("graft", "__main__.py"):
        args[0] = "graft"
    (run_dir / COMMAND).write_text(shlex.join(args) + "\n")


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith(("eval_", "test_", "source_", "forgotten")):
            rows.append(f"| {key} | {value:.4g} |")
    return rows


def write(
    export_dir: Path,
    cfg: FinetuneConfig,
    *,
    metrics: dict[str, Any],
    base: str,
    labels: list[str] | None,
    adapter: bool,
) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = export_dir.parent
    command_file = run_dir / COMMAND
    command = command_file.read_text().strip() if command_file.is_file() else None
    data = cfg.data
    data_desc = data.path if data.source in ("file", "hf") else data.source
    card_data = ModelCardData(
        base_model=base if "/" in base and not Path(base).is_absolute() else None,
        library_name="peft" if adapter else "transformers",
        tags=["graft", cfg.strategy.name, cfg.model.task],
        pipeline_tag={
            "sequence_classification": "text-classification",
            "causal_lm": "text-generation",
            "seq2seq": "text2text-generation",
            "image_classification": "image-classification",
        }.get(cfg.model.task),
    )
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {cfg.run.name}",
        "",
        f"Fine-tuned with graft from `{base}` ({cfg.model.name}, {cfg.model.task}).",
        "",
        "## Training",
        "",
        f"- strategy: `{cfg.strategy.name}`"
        + (f" (LoRA r={cfg.strategy.lora.r}, alpha={cfg.strategy.lora.alpha})" if adapter else ""),
        f"- data: `{data_desc}` (task {data.task}, max length {data.max_length})"
        + (f", labels: {', '.join(labels)}" if labels else ""),
        f"- {cfg.train.max_steps} steps, lr {cfg.train.lr:g} ({cfg.train.schedule}), micro batch "
        f"{cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum_steps} x "
        f"{cfg.scaling.num_workers} workers, DeepSpeed ZeRO-{cfg.deepspeed.stage}, seed "
        f"{cfg.train.seed}",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *(_metric_rows(metrics) or ["| (none recorded) | |"]),
        "",
        "## Reproduce",
        "",
        "```",
        command or f"graft finetune  # with the config in {run_dir.name}/config.yaml",
        "```",
        "",
        f"The full config is `{run_dir.name}/config.yaml`.",
        "",
    ]
    card = ModelCard("\n".join(lines))
    path = export_dir / "README.md"
    card.save(path)
    return path
