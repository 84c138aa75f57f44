"""causal_lm: next-token prediction, on prompt/response pairs or packed plain text.

    graft finetune model=tiny_llama data=jsonl data.task=instruction data.path=sft.jsonl

data.task=instruction: the prompt is masked out of the loss, so only response tokens
train; with a chat template, the whole exchange is rendered through it and the
assistant turn (as the template writes it, end-of-turn included) is what trains. data.task=text: every
paragraph, separated by EOS, packed into blocks of data.max_length. Evaluation sums the
loss and the token accuracy over target tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conf.schema import DataConfig
from jobs.tasks.common import IGNORE_INDEX, model_inputs, pad_ids


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return _ids(ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _conversation(
    tokenizer: Any, prompt: str, response: str, eos: list[int]
) -> tuple[list[int], list[int]]:
    """(input ids, targets) of one exchange, the prompt masked out. With a chat template
    the whole conversation goes through it, so the model trains on the assistant turn
    exactly as the template writes it (its end-of-turn token included) and as
    ``graft chat``/``predict`` will prompt it: the template's own assistant mask where
    it marks one (``{% generation %}``), else everything after the prompt rendered with
    the generation prompt. Without a template: prompt, newline, response, EOS."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if "{% generation %}" in template or "{%- generation %}" in template:
            out = tokenizer.apply_chat_template(
                turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(out["input_ids"])
            mask = list(out["assistant_masks"])
            return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        head = _prompt_ids(tokenizer, prompt)
        whole = _ids(tokenizer.apply_chat_template(turns, tokenize=True))
        if whole[: len(head)] == head and len(whole) > len(head):
            return whole, [IGNORE_INDEX] * len(head) + whole[len(head) :]
        # a template that renders the prompt differently once answered: the prompt as
        # the model is asked, then the response
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        return head + response_ids, [IGNORE_INDEX] * len(head) + response_ids
    head = _prompt_ids(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    return head + response_ids, [IGNORE_INDEX] * len(head) + response_ids


class CausalLM:
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    new_head = False
    modality = "text"
    needs = "causal_lm"
    generates = False

    def auto_class(self, config: Any, labels: list[str] | None) -> Any:
        return AutoModelForCausalLM

    def fields(self, data: DataConfig) -> tuple[str, ...]:
        if data.task == "instruction":
            return (data.prompt_field, data.response_field)
        return (data.text_field,)

    def labels(
        self, records: list[dict[str, str]], data: DataConfig
    ) -> tuple[list[dict[str, str]], list[str] | None]:
        return records, None

    def encode(
        self, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
    ) -> list[dict[str, Any]]:
        n = data.max_length
        eos = [tokenizer.eos_token_id]
        if data.task == "instruction":
            out = []
            for r in records:
                ids, target = _conversation(tokenizer, r["prompt"], r["response"], eos)
                ids, target = ids[:n], target[:n]
                # Keep only examples with a response token left after truncation.
                if any(t != IGNORE_INDEX for t in target[1:]):
                    out.append({"input_ids": ids, "labels": target})
            return out
        stream: list[int] = []
        for r in records:
            stream += tokenizer(r["text"], add_special_tokens=False)["input_ids"] + eos
        blocks = [stream[i : i + n] for i in range(0, len(stream) - 1, n)]
        return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_ids(examples, pad_id)
        labels = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
        return batch

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs.loss

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch)

    def scored_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # token t predicts t+1; only target tokens (responses, for instruction data)
        return logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX]

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = logits.float()[:, :-1], labels[:, 1:]  # token t predicts t+1
        mask = labels != IGNORE_INDEX
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        correct = ((logits.argmax(-1) == labels) & mask).sum()
        return torch.stack(
            [loss.detach(), torch.tensor(float(mask.sum())), correct.float()]
        ).double()

    def metrics(
        self, sums: torch.Tensor, prefix: str, *, confusion: bool = False
    ) -> dict[str, Any]:
        loss, count, correct = sums[:3].tolist()
        mean = loss / count
        return {
            f"{prefix}_loss": mean,
            f"{prefix}_accuracy": correct / count,
            f"{prefix}_perplexity": math.exp(min(mean, 50.0)),
        }

    def describe_input(self, length: int) -> str:
        return f"{length} tokens"

    def input_size(self, model: Any, data: DataConfig) -> int:
        return data.max_length

    def example_batch(
        self,
        *,
        batch_size: int,
        seq_len: int,
        vocab: int,
        num_labels: int,
        device: Any = None,
        generator: Any = None,
    ) -> dict[str, torch.Tensor]:
        if device is not None and torch.device(device).type == "meta":
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
            return {"input_ids": ids, "labels": ids}
        ids = torch.randint(4, vocab, (batch_size, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


TASK = CausalLM()
