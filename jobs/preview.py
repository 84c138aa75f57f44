"""``graft data preview``: the data as the model will see it, without Ray.

The first examples after the task's encoding (token ids and their text, what the loss
is computed on: a label, or the response tokens, with the prompt masked), the label
counts, the length percentiles before truncation at ``data.max_length`` (how much would
be cut), and the split sizes. Bad data fails here with the same error a run gives.
"""

from __future__ import annotations

from typing import Any

from conf.schema import FinetuneConfig
from jobs.tasks.common import IGNORE_INDEX


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def preview(cfg: FinetuneConfig, *, examples: int = 3) -> dict[str, Any]:
    """What ``graft data preview`` prints, as a dict (``--json`` prints it as it is)."""
    import dataclasses
    from collections import Counter

    from jobs import data as data_lib
    from jobs import tasks
    from jobs.models import build_tokenizer

    task = tasks.get(cfg.model)
    dataset = data_lib.load(cfg.data, task)
    out: dict[str, Any] = {
        "splits": {
            "train": len(dataset.train),
            "eval": len(dataset.eval),
            "test": len(dataset.test),
        },
        "task": cfg.data.task,
        "max_length": cfg.data.max_length,
    }
    if dataset.labels is not None:
        counts = Counter(r["label"] for r in dataset.train)
        out["labels"] = {name: counts.get(name, 0) for name in dataset.labels}
    if getattr(task, "modality", "text") != "text":
        out["examples"] = [dict(r) for r in dataset.train[:examples]]
        return out
    tokenizer = build_tokenizer(cfg.model)
    whole = dataclasses.replace(cfg.data, max_length=10**9)  # the lengths before truncation
    lengths = [
        len(e["input_ids"]) for e in task.encode(dataset.train, tokenizer, whole, dataset.labels)
    ]
    out["lengths"] = _percentiles(lengths)
    out["truncated"] = sum(n > cfg.data.max_length for n in lengths)
    encoded = task.encode(dataset.train[:examples], tokenizer, cfg.data, dataset.labels)
    shown = []
    for record, e in zip(dataset.train[:examples], encoded, strict=False):
        ids = list(e["input_ids"])
        item: dict[str, Any] = {
            "record": dict(record),
            "num_tokens": len(ids),
            "text": tokenizer.decode(ids),
        }
        labels = e.get("labels")
        if isinstance(labels, list):  # target tokens (the prompt masked): what trains
            trained = [t for t in labels if t != IGNORE_INDEX]
            item["trained_tokens"] = len(trained)
            item["trained_text"] = tokenizer.decode(trained)
        elif "label" in e and dataset.labels:
            item["label"] = dataset.labels[int(e["label"])]
        shown.append(item)
    out["examples"] = shown
    return out
