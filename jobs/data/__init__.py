"""Datasets for fine-tuning: read, split, encode, shard across workers, batch.

    python -c "from jobs.data import load; from conf.schema import DataConfig; \
        d = load(DataConfig(name='d', source='stdlib_docs')); print(len(d.train), d.labels)"

``load`` runs on the driver first (preflight: a bad file fails before Ray starts) and
again on every worker, which then keeps only its own shard.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from conf.schema import ConfigError, DataConfig
from jobs.data import files, stdlib_docs, wordnet

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


@dataclass
class Dataset:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    labels: list[str] | None  # classification only


def _read(cfg: DataConfig) -> list[dict[str, str]]:
    if cfg.source == "file":
        return files.read(cfg)
    if cfg.source == "stdlib_docs":
        return stdlib_docs.examples()
    if cfg.source == "wordnet_supersense":
        return wordnet.supersense_examples(cfg.path)
    return wordnet.instruction_examples(cfg.path)


def _normalise(records: list[dict[str, str]], cfg: DataConfig) -> list[dict[str, str]]:
    """Builtin sources use text/label/prompt/response; map the configured field names."""
    if cfg.source != "file":
        return records
    names = {
        cfg.text_field: "text",
        cfg.label_field: "label",
        cfg.prompt_field: "prompt",
        cfg.response_field: "response",
    }
    return [{names.get(k, k): v for k, v in r.items()} for r in records]


def load(cfg: DataConfig) -> Dataset:
    """Read, check labels, and split deterministically (same split on every worker)."""
    records = _normalise(_read(cfg), cfg)
    labels = None
    if cfg.task == "classification":
        if cfg.num_classes is not None:
            keep = {
                label
                for label, _ in Counter(r["label"] for r in records).most_common(cfg.num_classes)
            }
            records = [r for r in records if r["label"] in keep]
        if cfg.labels is not None:
            allowed = set(cfg.labels)
            for i, r in enumerate(records, start=1):
                if r["label"] not in allowed:
                    raise ConfigError(
                        "data.labels",
                        f"example {i} has label {r['label']!r}, not in the label set {cfg.labels}",
                    )
            labels = list(cfg.labels)
        else:
            labels = sorted({r["label"] for r in records})
        if len(labels) < 2:
            raise ConfigError(
                "data.path", f"classification needs at least 2 labels, found {labels}"
            )
    rng = random.Random(cfg.split_seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    num_eval = max(1, round(len(order) * cfg.eval_fraction))
    if len(order) - num_eval < 1:
        raise ConfigError("data.eval_fraction", f"{len(order)} examples leave none for training")
    return Dataset(
        train=[records[i] for i in order[num_eval:]],
        eval=[records[i] for i in order[:num_eval]],
        labels=labels,
    )


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def encode(
    records: list[dict[str, str]], tokenizer: Any, cfg: DataConfig, labels: list[str] | None
) -> list[dict[str, Any]]:
    """Token ids and labels, truncated to ``max_length``; padding happens per batch."""
    n = cfg.max_length
    if cfg.task == "classification":
        assert labels is not None
        index = {label: i for i, label in enumerate(labels)}
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=n)["input_ids"]
        return [
            {"input_ids": ids, "label": index[r["label"]]}
            for ids, r in zip(enc, records, strict=True)
        ]
    eos = [tokenizer.eos_token_id]
    if cfg.task == "instruction":
        out = []
        for r in records:
            prompt = _prompt_ids(tokenizer, r["prompt"])
            response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + response)[:n]
            target = ([IGNORE_INDEX] * len(prompt) + response)[:n]
            if any(
                t != IGNORE_INDEX for t in target[1:]
            ):  # keep only examples with a response left
                out.append({"input_ids": ids, "labels": target})
        return out
    # Plain text: pack every paragraph, separated by EOS, into blocks of max_length.
    stream: list[int] = []
    for r in records:
        stream += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + eos
    blocks = [stream[i : i + n] for i in range(0, len(stream) - 1, n)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch (right padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


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
        for i in range(index, per_epoch):
            yield collate(
                [encoded[j] for j in shard[i * micro_batch_size : (i + 1) * micro_batch_size]],
                pad_id,
            )
        micro_step = (epoch + 1) * per_epoch


def micro_batches_per_epoch(num_examples: int, *, world_size: int, micro_batch_size: int) -> int:
    return (num_examples // world_size) // micro_batch_size


def eval_batches(
    encoded: list[dict[str, Any]], *, rank: int, world_size: int, micro_batch_size: int, pad_id: int
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
            batches.append((collate([encoded[j] for j in idx], pad_id), True))
        else:
            batches.append((collate([encoded[(shard or [0])[0]]], pad_id), False))
    return batches
