"""Checks that need the model's config or the data, run on the driver before Ray starts.

    python -c "from jobs.config import compose; from jobs.preflight import preflight; \
        print(preflight(compose(['strategy=freeze_depth'])))"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from conf.schema import ConfigError, FinetuneConfig, TermConfig
from jobs import data as data_lib
from jobs import strategies, tasks
from jobs.models import Layout, hf_config, resolve_source
from jobs.strategies import Phase


@dataclass
class Preflight:
    num_blocks: int
    num_train: int
    num_eval: int
    labels: list[str] | None
    num_test: int = 0
    phases: list[Phase] = field(default_factory=list)


def preflight(cfg: FinetuneConfig) -> Preflight:
    cfg.check()
    from jobs.trackers import missing_packages

    missing = missing_packages(cfg.run.loggers)
    if missing:
        raise ConfigError(
            "run.loggers",
            f"{list(cfg.run.loggers)} needs {missing}, not installed here "
            f"(pip install {' '.join(missing)}); allowed without them: tensorboard",
        )
    if cfg.model.config_only:
        raise ConfigError(
            "model.config_only",
            f"{cfg.model.name} is an architecture without weights, for `graft plan`; to train "
            "it give its weights: model=hf model.path=<dir with config.json and safetensors>",
        )
    if cfg.strategy.name == "lora" and cfg.strategy.lora.quantize:
        raise ConfigError(
            "strategy.lora.quantize",
            "QLoRA training needs bitsandbytes on CUDA GPUs, which this build does not ship; "
            "`graft plan` estimates it; allowed here: null (16/32-bit LoRA)",
        )
    if cfg.model.arch is None:
        resolve_source(cfg.model)
    try:
        layout = Layout.of(hf_config(cfg.model))
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    k = cfg.strategy.num_trainable_blocks
    if k is not None and k > layout.num_blocks:
        raise ConfigError(
            "strategy.num_trainable_blocks",
            f"{k} is more than the model's {layout.num_blocks} blocks; allowed: 0..{layout.num_blocks}",
        )
    if cfg.strategy.name == "lora" and k == 0:
        raise ConfigError(
            "strategy.num_trainable_blocks", "lora needs >= 1 block to put adapters in, got 0"
        )
    _check_schedule(cfg)
    if cfg.strategy.name == "lora":
        _check_lora_targets(cfg, layout)
    task = tasks.get(cfg.model)
    if task.modality != "image":
        _check_context(cfg)
    _check_modality(cfg, layout, task)
    if task.modality == "image":
        _check_image_size(cfg)
    phases = strategies.phases(
        cfg.strategy, max_steps=cfg.train.max_steps, num_blocks=layout.num_blocks
    )
    _check_phases(cfg, phases, task)
    dataset = data_lib.load(cfg.data, task)
    if cfg.eval.source_path:  # the forgetting probe's file, read as the workers will
        data_lib.read_extra(
            cfg.eval.source_path, cfg.data, task, key="eval.source_path", labels=dataset.labels
        )
    _check_objectives(cfg, dataset.labels)
    return Preflight(
        layout.num_blocks,
        len(dataset.train),
        len(dataset.eval),
        dataset.labels,
        num_test=len(dataset.test),
        phases=phases,
    )


_READS = {"text": "text", "image": "images"}


def _check_schedule(cfg: FinetuneConfig) -> None:
    """An eval or checkpoint interval beyond the run never comes: the user meant less."""
    train = cfg.train
    for key in ("eval_every", "checkpoint_every"):
        every = getattr(train, key)
        if every > train.max_steps:
            raise ConfigError(
                f"train.{key}",
                f"{every} is more than train.max_steps={train.max_steps}, so it would never "
                f"come (only the last step would); allowed: 1..{train.max_steps}",
            )


def _check_context(cfg: FinetuneConfig) -> None:
    """data.max_length within the model's positions (text models)."""
    try:
        config = hf_config(cfg.model)
    except Exception:  # (an image model's config, or one checked elsewhere)
        return
    text = getattr(config, "text_config", None) or config
    limit = next(
        (
            getattr(text, k)
            for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
            if isinstance(getattr(text, k, None), int)
        ),
        None,
    )
    if limit is not None and getattr(config, "model_type", "") != "t5":
        if cfg.data.max_length > limit:
            raise ConfigError(
                "data.max_length",
                f"{cfg.data.max_length} is beyond {cfg.model.name}'s context of {limit} "
                f"positions; allowed: 1..{limit}",
            )


def _check_lora_targets(cfg: FinetuneConfig, layout: Layout) -> None:
    """Every strategy.lora.target_modules name is a module inside the adapted blocks (on
    the meta device: no weights read), so peft does not fail a minute into the workers."""
    targets = cfg.strategy.lora.target_modules
    if not targets:
        return
    from jobs.plan.trace import _meta_model

    model, _, _ = _meta_model(cfg)
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name}
    missing = [t for t in targets if t not in leaves]
    if missing:
        import difflib

        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "." in name
            }
        )
        hints = [
            f"{t!r} -> did you mean {close[0]!r}?"
            for t in missing
            if (close := difflib.get_close_matches(t, linear, n=1))
        ]
        raise ConfigError(
            "strategy.lora.target_modules",
            f"{missing} match no module of {cfg.model.name}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; allowed: names of its linear layers, {linear}",
        )


def _check_modality(cfg: FinetuneConfig, layout: Layout, task: tasks.Task) -> None:
    """A vision model reads images, a language model text: the task must match."""
    family = layout.family.modality
    if family == task.modality:
        if task.needs and not getattr(layout.family, task.needs):
            forms = [f for f in ("causal_lm", "encoder_decoder") if getattr(layout.family, f)]
            raise ConfigError(
                "model.task",
                f"model.task={task.name} needs a model with a {task.needs} form; "
                f"{cfg.model.name} ({hf_config(cfg.model).model_type}) has "
                + (", ".join(forms) if forms else "neither (an encoder)")
                + "; allowed for it: "
                + ", ".join(
                    n
                    for n, t in sorted(tasks.TASKS.items())
                    if t.modality == family and (not t.needs or getattr(layout.family, t.needs))
                ),
            )
        return
    model_type = hf_config(cfg.model).model_type
    fitting = sorted(name for name, t in tasks.TASKS.items() if t.modality == family)
    raise ConfigError(
        "model.task",
        f"{cfg.model.name} ({model_type}) reads {_READS[family]}, but model.task={task.name} "
        f"(data.task={cfg.data.task}) is {task.modality} data; allowed for this model: "
        f"{', '.join(fitting)} (with its data: "
        + ("data=image_folder" if family == "image" else "a text dataset")
        + ")",
    )


def _check_image_size(cfg: FinetuneConfig) -> None:
    """One forward pass on the meta device at the size preprocessing gives: a model that
    cannot take it (a ViT's fixed patch grid) fails here, not on a worker."""
    import torch

    from jobs.models import build_image_processor, model_class
    from jobs.tasks.image_classification import image_processor

    config = hf_config(cfg.model)
    size = image_processor(build_image_processor(cfg.model, config), cfg.data).size
    auto = model_class(cfg.model, config, ["a", "b"])
    with torch.device("meta"):
        model = auto.from_config(config).eval()
        try:
            model(pixel_values=torch.zeros(1, 3, *size))
        except (ValueError, RuntimeError) as e:
            native = getattr(config, "image_size", None)
            allowed = f"the model's own size {native}" if native else "a larger size"
            raise ConfigError(
                "data.image_size",
                f"{cfg.model.name} cannot take {size[0]}x{size[1]} images ({e}); "
                f"allowed: {allowed} (data.image_size=null uses the image processor's)",
            ) from None


def _check_phases(cfg: FinetuneConfig, phases: list[Phase], task: tasks.Task) -> None:
    if len(phases) > 1 and cfg.train.early_stopping.enabled:
        raise ConfigError(
            "train.early_stopping.enabled",
            "early stopping with strategy=progressive is not supported yet (the best "
            "checkpoint may belong to an earlier phase's engine); allowed: false",
        )
    if cfg.strategy.name == "progressive" and cfg.strategy.progressive.base == "lora":
        if not task.new_head and phases[0].trainable_blocks == 0:
            raise ConfigError(
                "strategy.num_trainable_blocks",
                f"progressive LoRA on {task.name} starts with 0 blocks and no new head: "
                "nothing would train in the first phase; allowed: >= 1",
            )


def _check_objectives(cfg: FinetuneConfig, labels: list[str] | None) -> None:
    """A term that cannot do anything under this config is an error here, not on a worker."""
    for i, term in enumerate(cfg.objectives):
        if term.name in ("l2sp", "ewc"):
            if cfg.strategy.name == "feature_extraction" or (
                cfg.strategy.name == "lora" and not cfg.strategy.train_embeddings
            ):
                raise ConfigError(
                    f"objectives[{i}].name",
                    f"{term.name} penalises the distance of trained pretrained weights, but "
                    f"strategy={cfg.strategy.name} trains none (only a new head or adapters); "
                    "allowed with: full, freeze_depth, progressive (base freeze_depth)",
                )
        if term.name == "ewc":
            _check_ewc(cfg, i, term.args, labels)
        if term.name == "l2sp":
            if term.args:
                raise ConfigError(
                    f"objectives[{i}].args", f"l2sp takes no args, got {sorted(term.args)}"
                )
        if term.name == "dann":
            _check_dann(cfg, i, term.args, labels)
        if term.name == "distill":
            _check_distill(cfg, i, term.args, labels)
        if term.name == "multitask":
            _check_multitask(cfg, i, term.args)


def _check_multitask(cfg: FinetuneConfig, index: int, args: dict[str, Any]) -> None:
    """The args, each task's rows read and split as the workers will, and LM heads only
    on families that have a causal LM."""
    from jobs.models import build_tokenizer
    from jobs.objectives import multitask

    multitask.check_args(index, args)
    term = multitask.MultiTask(TermConfig(name="multitask", args=args))
    tokenizer = None
    config = hf_config(cfg.model)
    family = Layout.of(config).family
    world, micro = cfg.scaling.num_workers, cfg.train.micro_batch_size
    for name, spec in term.specs.items():
        where = f"objectives[{index}].args.tasks.{name}"
        if spec.head == "lm" and not family.causal_lm:
            raise ConfigError(
                f"{where}.head",
                f"an LM head predicts the next token, which needs a decoder; "
                f"{config.model_type} is an encoder; allowed here: classification",
            )
        key = f"objectives[{index}].args.path" if spec.shared else f"{where}.path"
        train, _, labels = term.read(name, cfg.data, key=key)
        count = len(train)
        if spec.head == "lm":  # what trains is the encoded examples (packed text blocks)
            if tokenizer is None:
                tokenizer = build_tokenizer(cfg.model)
            count = len(spec.kind.encode(train, tokenizer, spec.data(cfg.data), labels))
        if count < world * micro:
            raise ConfigError(
                key,
                f"{count} training examples of task {name} over {world} workers do not "
                f"fill one micro batch of {micro}",
            )


def _check_ewc(
    cfg: FinetuneConfig, index: int, args: dict[str, Any], labels: list[str] | None
) -> None:
    """EWC's args and source file; for classification, a starting model whose own head
    predicts the run's labels (its gradients are what the Fisher measures)."""
    from jobs.objectives import distill, ewc

    ewc.check_args(index, args)
    task = tasks.get(cfg.model)
    key = f"objectives[{index}].args.source_path"
    data_lib.read_extra(str(args["source_path"]), cfg.data, task, key=key, labels=labels)
    if labels is None:
        return
    theirs = None if cfg.model.arch is not None else distill.labels_of(hf_config(cfg.model))
    if theirs != labels:
        raise ConfigError(
            f"objectives[{index}].name",
            f"ewc on classification needs a starting model that already predicts the run's "
            f"labels {labels}, in this order (fine-tuned on the source task, e.g. model=hf "
            f"model.path=<a graft run>/export); {cfg.model.name} has "
            f"{theirs if theirs else 'no such head'} (set data.labels to its order if only "
            "that differs); a new head's gradients say nothing about the source task",
        )


def _check_distill(
    cfg: FinetuneConfig, index: int, args: dict[str, Any], labels: list[str] | None
) -> None:
    """The args, and the teacher loaded as the workers will: it must read the student's
    tokens and predict the student's labels."""
    from jobs.models import build_tokenizer
    from jobs.objectives import distill

    distill.check_args(index, args)
    key = f"objectives[{index}].args.teacher"
    task = tasks.get(cfg.model)
    teacher, tokenizer = distill.load_teacher(str(args["teacher"]), task, key=key)
    distill.check_teacher(teacher, tokenizer, build_tokenizer(cfg.model), labels, key=key)


def _check_dann(
    cfg: FinetuneConfig, index: int, args: dict[str, Any], labels: list[str] | None
) -> None:
    """DANN's args, its target file read as the workers will read it (unlabelled)."""
    from jobs.objectives import dann

    dann.check_args(index, args)
    key = f"objectives[{index}].args.target_path"
    if args.get("target_eval_path"):
        dann.read_target_eval(
            str(args["target_eval_path"]),
            cfg.data,
            tasks.get(cfg.model),
            labels,
            key=f"objectives[{index}].args.target_eval_path",
        )
    # The target domain's training data is unlabelled: a label field is refused.
    rows = dann.read_target(str(args["target_path"]), cfg.data, key=key)
    world = cfg.scaling.num_workers
    if len(rows) < world * cfg.train.micro_batch_size:
        raise ConfigError(
            key,
            f"{len(rows)} target examples over {world} workers do not fill one micro batch "
            f"of {cfg.train.micro_batch_size}",
        )
