"""Datasets: deterministic splits, disjoint equal shards, response-only LM loss, resumable order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from conf.schema import ConfigError, DataConfig
from jobs import data
from jobs.data import IGNORE_INDEX, stdlib_docs
from jobs.models import byte_tokenizer


def _cfg(path: Path, **kw) -> DataConfig:  # type: ignore[no-untyped-def]
    return DataConfig(name="t", source="file", path=str(path), **kw)


def test_split_is_deterministic_and_disjoint(data_dir: Path) -> None:
    a, b = data.load(_cfg(data_dir / "cls.jsonl")), data.load(_cfg(data_dir / "cls.jsonl"))
    assert a.train == b.train and a.eval == b.eval
    assert len(a.eval) == 24 and len(a.train) == 216
    assert a.labels == ["neg", "pos"]
    other = data.load(_cfg(data_dir / "cls.jsonl", split_seed=1))
    assert other.eval != a.eval


def test_csv_with_custom_columns_and_a_bad_row(tmp_path: Path) -> None:
    good = tmp_path / "d.csv"
    good.write_text("review,stars\nloved it,5\nhated it,1\nfine,3\n")
    ds = data.load(_cfg(good, text_field="review", label_field="stars", eval_fraction=0.34))
    assert ds.labels == ["1", "3", "5"] and {r["text"] for r in ds.train + ds.eval} == {
        "loved it",
        "hated it",
        "fine",
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\nloved it,5\n,1\n")
    with pytest.raises(ConfigError, match=r"bad.csv:3"):
        data.load(_cfg(bad, text_field="review", label_field="stars"))
    with pytest.raises(ConfigError, match="header"):
        data.load(_cfg(good))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_shards_are_disjoint_equal_and_reshuffled_each_epoch(world: int) -> None:
    shards = [
        data.train_shard(101, rank=r, world_size=world, epoch=0, seed=0) for r in range(world)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 101 // world
    flat = list(itertools.chain(*shards))
    assert len(flat) == len(set(flat))
    assert data.train_shard(101, rank=0, world_size=world, epoch=1, seed=0) != shards[0]


def test_resuming_mid_epoch_yields_the_same_batches(data_dir: Path) -> None:
    tok = byte_tokenizer()
    cfg = _cfg(data_dir / "cls.jsonl")
    ds = data.load(cfg)
    enc = data.encode(ds.train, tok, cfg, ds.labels)
    kw = {"rank": 1, "world_size": 2, "seed": 3, "micro_batch_size": 8, "pad_id": tok.pad_token_id}
    straight = list(
        itertools.islice(data.train_batches(enc, **kw), 30)
    )  # crosses an epoch (13/epoch)
    resumed = list(itertools.islice(data.train_batches(enc, start_micro_step=17, **kw), 13))
    for a, b in zip(straight[17:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_instruction_loss_covers_only_the_response(data_dir: Path) -> None:
    tok = byte_tokenizer()
    cfg = _cfg(data_dir / "instruct.jsonl", task="instruction")
    ds = data.load(cfg)
    example = data.encode(ds.train[:1], tok, cfg, None)[0]
    prompt, response = ds.train[0]["prompt"], ds.train[0]["response"]
    prompt_len = 1 + len(tok(prompt + "\n", add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE_INDEX for t in example["labels"][:prompt_len])
    targets = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tok.decode(targets, skip_special_tokens=True) == response
    assert targets[-1] == tok.eos_token_id


def test_plain_text_is_packed_into_max_length_blocks(data_dir: Path) -> None:
    tok = byte_tokenizer()
    cfg = _cfg(data_dir / "text.txt", task="text", max_length=32)
    ds = data.load(cfg)
    blocks = data.encode(ds.train, tok, cfg, None)
    assert (
        all(len(b["input_ids"]) == 32 for b in blocks[:-1])
        and blocks[0]["labels"] == blocks[0]["input_ids"]
    )
    with pytest.raises(ConfigError, match="data.task=text"):
        data.load(_cfg(data_dir / "text.txt"))


def test_eval_batches_line_up_across_ranks() -> None:
    enc = [{"input_ids": [1, 2, 3], "label": i % 2} for i in range(9)]
    per_rank = [
        data.eval_batches(enc, rank=r, world_size=4, micro_batch_size=2, pad_id=0) for r in range(4)
    ]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    counted = sum(
        int(b["labels"].numel()) for batches in per_rank for b, counts in batches if counts
    )
    assert counted == 9  # every example counted exactly once


def test_stdlib_docs_is_a_real_multiclass_set() -> None:
    examples = stdlib_docs.examples()
    labels = {e["label"] for e in examples}
    assert labels == set(stdlib_docs.AREAS) and len(examples) > 1000
    assert len({e["text"] for e in examples}) == len(examples)


# A ChatML-like template (as SmolLM2's), and the same with the assistant turn marked.
CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATML_MARKED = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template", [CHATML, CHATML_MARKED], ids=["prefix", "generation-mask"])
def test_instruction_targets_are_the_assistant_turn_as_the_chat_template_writes_it(
    template: str,
) -> None:
    """What trains is the reply plus the template's end of turn, after exactly the
    prompt that inference (the generation prompt) will give the model."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    cfg = DataConfig(name="t", source="file", path="x", task="instruction", max_length=256)
    (example,) = data.encode(
        [{"prompt": "color of a lime?", "response": "green"}], tokenizer, cfg, None
    )
    ids, targets = example["input_ids"], example["labels"]
    asked = tokenizer.apply_chat_template(
        [{"role": "user", "content": "color of a lime?"}], add_generation_prompt=True, tokenize=True
    )
    asked = list(asked["input_ids"] if hasattr(asked, "keys") else asked)
    trained = [t for t in targets if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "green<|end|>" + ("\n" if template == CHATML else "")
    # the masked part is the prompt exactly as the model is asked at inference
    first = next(i for i, t in enumerate(targets) if t != IGNORE_INDEX)
    assert ids[:first] == asked
    assert ids[first : first + len(trained)] == trained
