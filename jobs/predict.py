"""Use a trained run: load its export, predict on new records, merge a LoRA adapter.

    graft predict runs/<run> --input new.jsonl [--output predictions.jsonl]
    graft merge-lora runs/<run> [--output DIR]
    graft chat runs/<run>

Everything here runs in the calling process (no Ray, no DeepSpeed): a run's export is a
plain Hugging Face model (``export/``), a peft adapter (``export/adapter``, on the base
it names, or the ``export/base`` saved beside it) and, with ``run.export_merged``, the
merged model (``export/merged``). The run's ``config.yaml`` says what the model is for
(the task: classification, causal LM, seq2seq) and how records are read, so new
records go through the same readers, field names and errors as training data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from conf.schema import ConfigError, FinetuneConfig
from jobs import resume as resume_lib
from jobs.tasks.common import IGNORE_INDEX as IGNORE

EXPORT = "export"


@dataclasses.dataclass
class Trained:
    """A run's exported model, loaded, with what it needs to read records."""

    cfg: FinetuneConfig
    model: Any
    tokenizer: Any
    labels: list[str] | None
    source: Path  # the directory the weights came from
    kind: str  # "full", "merged" or "adapter"


def run_config(run: Path) -> tuple[Path, FinetuneConfig]:
    """The run directory (``run`` itself, or the run an ``export`` folder is in) and
    the config it was trained with."""
    from jobs.config import load_saved

    run = Path(run).expanduser().resolve()
    if run.name in (EXPORT, "adapter", "merged") and not (run / resume_lib.CONFIG).is_file():
        run = run.parent if run.name == EXPORT else run.parent.parent
    config = run / resume_lib.CONFIG
    if not config.is_file():
        raise ConfigError(
            "RUN", f"{run} is not a run directory (no {resume_lib.CONFIG}); allowed: runs/<name>"
        )
    return run, load_saved(run)


def export_dir(run: Path) -> Path:
    out = run / EXPORT
    if not out.is_dir() or not any(out.iterdir()):
        raise ConfigError(
            "RUN",
            f"{run} has no export ({out} is missing): the run did not finish, or ran with "
            "run.export=false; rerun it with run.export=true",
        )
    return out


def load(run: Path, *, prefer: str = "merged") -> Trained:
    """The run's exported model in eval mode: the merged model when there is one (and
    ``prefer`` is "merged"), else the adapter on its base, else the full model."""
    import peft
    from transformers import AutoTokenizer

    from jobs import tasks

    run, cfg = run_config(run)
    out = export_dir(run)
    labels_file = out / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    task = tasks.get(cfg.model)
    merged, adapter = out / "merged", out / "adapter"
    if prefer == "merged" and (merged / "config.json").is_file():
        source, kind = merged, "merged"
    elif (adapter / "adapter_config.json").is_file():
        source, kind = adapter, "adapter"
    elif (out / "config.json").is_file():
        source, kind = out, "full"
    else:
        raise ConfigError(
            "RUN", f"{out} holds no model (no config.json, no adapter/adapter_config.json)"
        )
    if kind == "adapter":
        base_path = json.loads((adapter / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        base = _load_model(task, base_path, labels)
        model = peft.PeftModel.from_pretrained(base, str(adapter))
    else:
        model = _load_model(task, str(source), labels)
    tokenizer = AutoTokenizer.from_pretrained(str(source if kind != "adapter" else adapter))
    model.eval()
    return Trained(cfg, model, tokenizer, labels, source, kind)


def _load_model(task: Any, path: str, labels: list[str] | None) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    return task.auto_class(config, labels).from_pretrained(path, config=config)


# --------------------------------------------------------------------------- predict
@dataclasses.dataclass
class Generation:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def read_input(trained: Trained, path: Path) -> list[dict[str, Any]]:
    """New records, read as the run's training data is (its field names, its readers and
    their errors); the target field (label, response) may be there or not."""
    from jobs.data import files, normalise

    cfg = trained.cfg
    data = dataclasses.replace(cfg.data, path=str(path))
    field = _input_field(trained)
    records = normalise(files.read(str(path), data, (field,), key="--input"), data)
    whole = _whole_rows(Path(path))  # (the records' other fields go through to the output)
    if whole is not None and len(whole) == len(records):
        return [{**w, **r} for w, r in zip(whole, records, strict=True)]
    return list(records)


def _whole_rows(path: Path) -> list[dict[str, Any]] | None:
    import csv

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return rows if all(isinstance(r, dict) for r in rows) else None
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    return None


def _task(trained: Trained) -> Any:
    from jobs import tasks

    return tasks.get(trained.cfg.model)


def _encoder_decoder(trained: Trained) -> bool:
    return bool(_task(trained).needs == "encoder_decoder")


def _input_field(trained: Trained) -> str:
    """The field a record's input is in: the task's first (text, or the prompt)."""
    task = _task(trained)
    if task.modality != "text":
        raise ConfigError(
            "RUN", "graft predict reads text; an image classifier's export loads in "
            "transformers (AutoModelForImageClassification) for images"
        )  # fmt: skip
    return str(task.fields(trained.cfg.data)[0])


def predict(
    trained: Trained,
    records: list[dict[str, Any]],
    *,
    batch_size: int = 16,
    generation: Generation | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> Iterator[dict[str, Any]]:
    """Each record with its prediction: ``label`` and ``probabilities`` (a classifier),
    or ``generation`` (a causal LM or seq2seq model), in batches of ``batch_size``."""
    generation = generation or Generation()
    key = "prompt" if _input_field(trained) == trained.cfg.data.prompt_field else "text"
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        texts = [str(r[key]) for r in batch]
        with torch.no_grad():
            if trained.labels is not None:
                outs = _classify(trained, texts)
            else:
                outs = _generate(trained, texts, generation)
        for record, out in zip(batch, outs, strict=True):
            yield {**record, **out}
        progress(len(batch))


def _classify(trained: Trained, texts: list[str]) -> list[dict[str, Any]]:
    assert trained.labels is not None
    enc = trained.tokenizer(
        texts,
        truncation=True,
        max_length=trained.cfg.data.max_length,
        padding=True,
        return_tensors="pt",
    )
    probs = torch.softmax(trained.model(**enc).logits.float(), dim=-1)
    return [
        {
            "predicted_label": trained.labels[int(p.argmax())],
            "probabilities": {name: float(p[i]) for i, name in enumerate(trained.labels)},
        }
        for p in probs
    ]


def prompt_ids(trained: Trained, prompt: str) -> list[int]:
    """The prompt as training encoded it (the chat template when the tokenizer has one)."""
    if _encoder_decoder(trained):
        ids = trained.tokenizer(prompt, truncation=True, max_length=trained.cfg.data.max_length)
        return list(ids["input_ids"])
    from jobs.tasks.causal_lm import _prompt_ids

    return _prompt_ids(trained.tokenizer, prompt)


def _generate(trained: Trained, texts: list[str], gen: Generation) -> list[dict[str, Any]]:
    encoded = [prompt_ids(trained, t) for t in texts]
    return [{"generation": text} for text in _generate_ids(trained, encoded, gen)]


def _generate_ids(trained: Trained, encoded: list[list[int]], gen: Generation) -> list[str]:
    tok = trained.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(e) for e in encoded)
    decoder_only = not _encoder_decoder(trained)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding for a decoder: generation goes on the right
        if decoder_only:
            ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
        else:
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    sample = gen.temperature > 0
    out = trained.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=gen.max_new_tokens,
        do_sample=sample,
        **({"temperature": gen.temperature, "top_p": gen.top_p} if sample else {}),
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    new = out[:, width:] if decoder_only else out
    return [str(tok.decode(row, skip_special_tokens=True)).strip() for row in new]


def chat_reply(trained: Trained, history: list[dict[str, str]], gen: Generation) -> str:
    """The model's next turn after ``history`` (user/assistant messages), through the
    tokenizer's chat template (a tokenizer without one: the turns as plain lines)."""
    tok = trained.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = prompt_ids(trained, "\n".join(m["content"] for m in history))
    out = _generate_ids(trained, [ids], gen)
    return out[0]


def write_predictions(rows: Iterator[dict[str, Any]], output: Path) -> int:
    """The predictions as JSON lines, written to a temporary file and renamed (an
    interrupted predict leaves no half file); returns how many."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(output)
    return n


# --------------------------------------------------------------------------- evaluate
def evaluate_file(trained: Trained, path: Path, *, batch_size: int = 16) -> dict[str, Any]:
    """The export scored on a labelled file (read as training data is, target field
    required): a classifier's accuracy, macro-F1, per-class precision/recall and the
    confusion matrix (rows: true label); a language model's loss and perplexity over
    the target tokens."""
    import math

    from jobs import tasks
    from jobs.data import files, normalise

    cfg = trained.cfg
    data = dataclasses.replace(cfg.data, path=str(path))
    task = tasks.get(cfg.model)
    records = normalise(files.read(str(path), data, task.fields(data), key="--data"), data)
    if trained.labels is not None:
        unknown = sorted({r["label"] for r in records} - set(trained.labels))
        if unknown:
            raise ConfigError("--data", f"labels {unknown} are not the run's: {trained.labels}")
        index = {name: i for i, name in enumerate(trained.labels)}
        k = len(trained.labels)
        confusion = torch.zeros((k, k), dtype=torch.long)
        for row in predict(trained, records, batch_size=batch_size):
            confusion[index[row["label"]], index[row["predicted_label"]]] += 1
        from jobs.tasks.sequence_classification import macro_f1

        tp = confusion.diag().double()
        per_class = {
            name: {
                "precision": float(tp[i] / max(1, int(confusion[:, i].sum()))),
                "recall": float(tp[i] / max(1, int(confusion[i].sum()))),
                "support": int(confusion[i].sum()),
            }
            for i, name in enumerate(trained.labels)
        }
        return {
            "examples": len(records),
            "accuracy": float(tp.sum() / max(1, len(records))),
            "macro_f1": macro_f1(confusion),
            "per_class": per_class,
            "confusion": confusion.tolist(),
            "labels": trained.labels,
        }
    encoded = task.encode(records, trained.tokenizer, data, None)
    pad = trained.tokenizer.pad_token_id or 0
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = task.collate(encoded[start : start + batch_size], pad)
            outputs = trained.model(**task.model_inputs(batch))
            logits = outputs.logits.float()
            labels = batch["labels"]
            if not _encoder_decoder(trained):  # next-token: position t predicts t + 1
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != IGNORE
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
            )
            total += float(losses[mask.reshape(-1)].sum())
            count += float(mask.sum())
    loss = total / max(1.0, count)
    return {"examples": len(records), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# --------------------------------------------------------------------------- merge
def merge_lora(run: Path, output: Path | None = None) -> Path:
    """The adapter merged into its base, saved as a plain transformers model (with the
    tokenizer and labels) to ``output`` (default: ``<run>/export/merged``)."""
    run_dir, cfg = run_config(run)
    if not (export_dir(run_dir) / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(
            "RUN",
            f"{run_dir / EXPORT} holds a full model, not a LoRA adapter (the run's strategy is "
            f"{cfg.strategy.name}); merge-lora needs a run with strategy=lora or qlora",
        )
    trained = load(run_dir, prefer="adapter")
    merged = trained.model.merge_and_unload()
    target = Path(output) if output else trained.source.parent / "merged"
    merged.save_pretrained(target)
    trained.tokenizer.save_pretrained(target)
    if trained.labels is not None:
        (target / "labels.json").write_text(json.dumps(trained.labels))
    return target
