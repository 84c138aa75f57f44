"""Datasets for fine-tuning: read, split, encode, shard across workers, batch.

    python -c "from jobs.data import load; from conf.schema import DataConfig; \
        d = load(DataConfig(name='d', source='stdlib_docs')); print(len(d.train), d.labels)"

``load`` runs on the driver first (preflight: a bad file fails before Ray starts) and
again on every worker, which then keeps only its own shard.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conf.schema import ConfigError, DataConfig
from jobs.data import files, stdlib_docs, wordnet
from jobs.tasks.common import EPOCH_SEED, IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "collate",
    "encode",
    "eval_batches",
    "load",
    "normalise",
    "train_batches",
]

Collate = Callable[[list[dict[str, Any]], int], dict[str, torch.Tensor]]


@dataclass
class Dataset:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    labels: list[str] | None  # classification only
    # Held out from training, early stopping and the sweep's choice: only reported.
    test: list[dict[str, str]] = field(default_factory=list)


def _read(cfg: DataConfig, fields: tuple[str, ...]) -> list[dict[str, str]]:
    if cfg.source == "file":
        assert cfg.path is not None
        return files.read(cfg.path, cfg, fields, key="data.path")
    if cfg.source == "hf":
        from jobs.data import hf_datasets

        return hf_datasets.read(cfg, fields, split=cfg.hf_split, split_key="data.hf_split")
    if cfg.source == "stdlib_docs":
        return stdlib_docs.examples()
    if cfg.source == "wordnet_supersense":
        return wordnet.supersense_examples(cfg.path)
    return wordnet.instruction_examples(cfg.path)


def normalise(records: list[dict[str, str]], cfg: DataConfig) -> list[dict[str, str]]:
    """Builtin sources use text/label/prompt/response; map the configured field names."""
    names = {
        cfg.text_field: "text",
        cfg.label_field: "label",
        cfg.prompt_field: "prompt",
        cfg.response_field: "response",
        cfg.image_field: "image",
    }
    return [{names.get(k, k): v for k, v in r.items()} for r in records]


def load(cfg: DataConfig, task: Any = None) -> Dataset:
    """Read, check labels, and split deterministically (same split on every worker).

    Test examples come from ``data.test_path`` (read as it is), else a
    ``data.test_fraction`` share of the shuffled data; evaluation examples from
    ``data.eval_path``, else a ``data.eval_fraction`` share of what is left."""
    from jobs import tasks

    task = task or tasks.for_data(cfg)
    fields = task.fields(cfg)
    records = _read(cfg, fields)
    if cfg.source in ("file", "hf"):
        records = normalise(records, cfg)
    given = {
        split: normalise(files.read(path, cfg, fields, key=f"data.{split}_path"), cfg)
        for split, path in (("eval", cfg.eval_path), ("test", cfg.test_path))
        if path is not None
    }
    for split, name in (("eval", cfg.hf_eval_split), ("test", cfg.hf_test_split)):
        if name is not None:
            from jobs.data import hf_datasets

            rows = hf_datasets.read(cfg, fields, split=name, split_key=f"data.hf_{split}_split")
            given[split] = normalise(rows, cfg)
    records, labels = task.labels(records, cfg)
    if labels is not None:
        for split, rows in given.items():
            unknown = sorted({r["label"] for r in rows} - set(labels))
            if unknown:
                raise ConfigError(
                    f"data.hf_{split}_split"
                    if getattr(cfg, f"hf_{split}_split")
                    else f"data.{split}_path",
                    f"labels {unknown} do not occur in the training data; its labels: {labels}",
                )
    rng = random.Random(cfg.split_seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    num_test = (
        0
        if "test" in given or not cfg.test_fraction
        else max(1, round(len(order) * cfg.test_fraction))
    )
    test, order = [records[i] for i in order[:num_test]], order[num_test:]
    num_eval = 0 if "eval" in given else max(1, round(len(order) * cfg.eval_fraction))
    if len(order) - num_eval < 1:
        key = "data.test_fraction" if num_test else "data.eval_fraction"
        raise ConfigError(key, f"{len(order) + num_test} examples leave none for training")
    return Dataset(
        train=[records[i] for i in order[num_eval:]],
        eval=given.get("eval", [records[i] for i in order[:num_eval]]),
        labels=labels,
        test=given.get("test", test),
    )


def read_extra(
    path: str, cfg: DataConfig, task: Any, *, key: str, labels: list[str] | None
) -> tuple[list[dict[str, str]], DataConfig]:
    """Another file of the run's kind of data (a source task's, for EWC's Fisher or the
    forgetting probe): read like ``data.path``, or, for a language model, a .txt file
    as plain text. Labels must be among the run's. Returns the records and the data
    config to encode them with."""
    if Path(path).suffix.lower() == ".txt" and "text" in _TEXT_TASKS.get(cfg.task, ()):
        cfg = dataclasses.replace(cfg, task="text")
    records = normalise(files.read(path, cfg, task.fields(cfg), key=key), cfg)
    if labels is not None:
        unknown = sorted({r["label"] for r in records} - set(labels))
        if unknown:
            raise ConfigError(key, f"labels {unknown} are not the run's; its labels: {labels}")
    return records, cfg


# The formats a file may switch a run's data to (a language model reads plain text too).
_TEXT_TASKS = {"instruction": ("text",), "text": ("text",)}


def encode(
    records: list[dict[str, str]], tokenizer: Any, cfg: DataConfig, labels: list[str] | None
) -> list[dict[str, Any]]:
    """Token ids and labels, truncated to ``max_length``, as the data's task encodes them."""
    from jobs import tasks

    return tasks.for_data(cfg).encode(records, tokenizer, cfg, labels)


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch (right padding); either text task."""
    from jobs import tasks

    return tasks.for_examples(examples).collate(examples, pad_id)


def train_shard(
    num_examples: int, *, rank: int, world_size: int, epoch: int, seed: int
) -> list[int]:
    """This rank's example indices for one epoch: a seeded shuffle, dealt round-robin.

    Every rank gets the same count (the remainder is dropped) so every rank runs the
    same number of steps: the collectives in each step must line up.
    """
    order = torch.randperm(
        num_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)
    ).tolist()
    per_rank = num_examples // world_size
    return order[rank::world_size][:per_rank]


def train_batches(
    encoded: list[dict[str, Any]],
    *,
    rank: int,
    world_size: int,
    seed: int,
    micro_batch_size: int,
    pad_id: int,
    start_micro_step: int = 0,
    collate_fn: Collate = collate,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro batches for this rank, epoch after epoch, starting at a global micro step
    (so a resumed run sees exactly the batches the uninterrupted run would have)."""
    per_epoch = micro_batches_per_epoch(
        len(encoded), world_size=world_size, micro_batch_size=micro_batch_size
    )
    if per_epoch == 0:
        raise ConfigError(
            "train.micro_batch_size",
            f"{len(encoded)} training examples over {world_size} workers do not fill one micro batch of {micro_batch_size}",
        )
    micro_step = start_micro_step
    while True:
        epoch, index = divmod(micro_step, per_epoch)
        shard = train_shard(len(encoded), rank=rank, world_size=world_size, epoch=epoch, seed=seed)
        # Each example carries its epoch's draw, for augmentation that resumes exactly.
        draw = seed * 1000 + epoch
        for i in range(index, per_epoch):
            yield collate_fn(
                [
                    {**encoded[j], EPOCH_SEED: draw}
                    for j in shard[i * micro_batch_size : (i + 1) * micro_batch_size]
                ],
                pad_id,
            )
        micro_step = (epoch + 1) * per_epoch


def continue_order(
    micro_step: int, *, num_examples: int, was: tuple[int, int], now: tuple[int, int]
) -> int:
    """The micro step, in a gang of ``now`` = (workers, micro batch), at which the data
    order continues where a gang of ``was`` stopped at ``micro_step``.

    Each global micro step takes the next ``workers x micro batch`` positions of the
    epoch's shuffled order (rank r the r-th of every ``workers``), so where the order
    stands is ``index x workers x micro batch`` positions into epoch ``epoch``; the new
    gang goes on from there, through the rest of that epoch (its dropped remainder is
    its own), and on to the next. With the global batch kept, the position is a whole
    number of the new gang's micro steps: nothing repeated, nothing skipped; otherwise
    up to one micro batch is seen twice rather than skipped."""
    old_per = micro_batches_per_epoch(num_examples, world_size=was[0], micro_batch_size=was[1])
    new_per = micro_batches_per_epoch(num_examples, world_size=now[0], micro_batch_size=now[1])
    epoch, index = divmod(micro_step, old_per)
    position = index * was[0] * was[1]
    new_index = position // (now[0] * now[1])
    if new_index >= new_per:
        epoch, new_index = epoch + 1, 0
    return epoch * new_per + new_index


def micro_batches_per_epoch(num_examples: int, *, world_size: int, micro_batch_size: int) -> int:
    return (num_examples // world_size) // micro_batch_size


def eval_batches(
    encoded: list[dict[str, Any]],
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    pad_id: int,
    collate_fn: Collate = collate,
) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's eval batches as (batch, counts). Every rank gets the same number of
    batches (ZeRO-3 forwards are collective); a rank with fewer examples repeats its
    first batch with counts=False so it joins the collectives without being counted."""
    shard = list(range(rank, len(encoded), world_size))
    num_batches = -(-((len(encoded) + world_size - 1) // world_size) // micro_batch_size)
    batches = []
    for b in range(num_batches):
        idx = shard[b * micro_batch_size : (b + 1) * micro_batch_size]
        if idx:
            batches.append((collate_fn([encoded[j] for j in idx], pad_id), True))
        else:
            batches.append((collate_fn([encoded[(shard or [0])[0]]], pad_id), False))
    return batches
