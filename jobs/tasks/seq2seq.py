"""seq2seq: an encoder-decoder (T5, BART) maps the prompt to the response.

    graft finetune model=hf model.path=/models/flan-t5-base model.task=seq2seq \
        data=jsonl data.task=instruction data.path=pairs.jsonl

Records are {prompt, response} (the instruction format): the encoder reads the prompt,
the decoder is trained on the response alone (teacher forcing; the loss is over target
tokens only). Evaluation sums the loss and the token accuracy over targets like the
causal LM, and, by generating each response greedily (up to ``eval.max_new_tokens``
tokens), the exact matches and ROUGE-L F1 (Google's ``rouge-score``): all sums, so they
all-reduce across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM

from conf.schema import DataConfig
from jobs.tasks import causal_lm
from jobs.tasks.common import IGNORE_INDEX, pad_ids

# the columns generation adds to the sums: examples, exact matches, ROUGE-L F1
_GENERATED = 3


def _normalise(text: str) -> str:
    return " ".join(text.split())


class Seq2Seq:
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    new_head = False
    modality = "text"
    needs = "encoder_decoder"
    generates = True

    def auto_class(self, config: Any, labels: list[str] | None) -> Any:
        return AutoModelForSeq2SeqLM

    def fields(self, data: DataConfig) -> tuple[str, ...]:
        return (data.prompt_field, data.response_field)

    def labels(
        self, records: list[dict[str, str]], data: DataConfig
    ) -> tuple[list[dict[str, str]], list[str] | None]:
        return records, None

    def encode(
        self, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
    ) -> list[dict[str, Any]]:
        n = data.max_length
        eos = [tokenizer.eos_token_id]
        prompts = tokenizer([r["prompt"] for r in records], truncation=True, max_length=n)
        targets = tokenizer([r["response"] for r in records], add_special_tokens=False)
        return [
            {"input_ids": ids, "labels": (target + eos)[:n]}
            for ids, target in zip(prompts["input_ids"], targets["input_ids"], strict=True)
        ]

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = pad_ids(examples, pad_id)
        width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
        return batch

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs.loss

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the decoder's inputs are the targets shifted right: the model makes them
        return batch

    def scored_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the decoder's position t predicts target token t (the model shifts its inputs)
        return logits[batch["labels"] != IGNORE_INDEX]

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
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

    def generation_sums(
        self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any, *, max_new_tokens: int
    ) -> torch.Tensor:
        """Per example [1, exact match, ROUGE-L F1] of the greedy generation against the
        target ([B, 3]). Every rank runs the same number of decoder steps
        (``synced_gpus``): under ZeRO-3 each step gathers parameters collectively."""
        from rouge_score import rouge_scorer

        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            synced_gpus=synced,
        )
        labels = batch["labels"].masked_fill(
            batch["labels"] == IGNORE_INDEX, tokenizer.pad_token_id
        )
        predictions = tokenizer.batch_decode(generated, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        rows = [
            [
                1.0,
                float(_normalise(p) == _normalise(r)),
                scorer.score(r, p)["rougeL"].fmeasure,
            ]
            for p, r in zip(predictions, references, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float64)

    def metrics(
        self, sums: torch.Tensor, prefix: str, *, confusion: bool = False
    ) -> dict[str, Any]:
        # the token statistics are a causal LM's (loss, token accuracy, perplexity)
        out = causal_lm.TASK.metrics(sums[:3], prefix)
        if sums.numel() >= 3 + _GENERATED:
            examples, exact, rouge = sums[3 : 3 + _GENERATED].tolist()
            out[f"{prefix}_exact_match"] = exact / examples
            out[f"{prefix}_rougeL"] = rouge / examples
        return out

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
            # decoder inputs given: a config-only model may not say how decoding starts
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
            return {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}
        ids = torch.randint(4, vocab, (batch_size, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


TASK = Seq2Seq()
