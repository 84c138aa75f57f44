"""Zero- and few-shot baselines: how far the pretrained model gets with no training.

    graft eval zero_shot model=smollm2_135m data=wordnet_supersense
    graft eval few_shot model=minilm data=wordnet_supersense eval.shots=8

A causal LM (LLaMA, SmolLM2, GPT-2) classifies by likelihood: after each prompt
template (``eval.templates``, ``{text}`` the example), every label's words
(``eval.label_names``, else the label with ``. _ -`` as spaces) are scored by their mean
token log-probability; the templates' scores are averaged and the most likely label
wins. The prompt is run once per example and its key/value cache reused for every
label (and, few-shot, the shots' prefix once per template for all examples), so a
label costs only its own tokens. ``few_shot`` puts ``eval.shots`` labelled training
examples per label in front of the prompt (seeded, shuffled).

An encoder (BERT, MiniLM) classifies by similarity of mean-pooled, normalised
embeddings: zero-shot against each label's words embedded the same way, few-shot
against the class centroids of ``eval.shots`` training examples per label: the cheap
reference nothing trains.

Scores are treated as logits (cosine similarity / 0.05 for an encoder), so the
validation and test splits get the metrics a fine-tuned classifier gets (loss, accuracy,
macro-F1) and per-example sums for the sweep's paired bootstrap. Runs in the calling
process (no Ray): the model is read once and never changed. The run directory holds
config.yaml, metrics.jsonl (a start and an end record, like a training run's) and
example_sums_<split>.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conf.schema import ConfigError, FinetuneConfig
from jobs import config as config_lib
from jobs import data as data_lib
from jobs import runlog, tasks
from jobs.models import (
    build_image_processor,
    build_tokenizer,
    hf_config,
    resolve_source,
    weights_dir,
)
from jobs.models.families import family_of

KINDS = ("zero_shot", "few_shot")
# The labelled data format (data.task) a model of each modality scores.
SCORABLE = {"text": ("classification",), "image": ("image_classification",)}
# An encoder's cosine similarities become logits at this temperature (the usual one
# for normalised sentence embeddings): it scales the loss, never the ranking.
TEMPERATURE = 0.05
# eval.calibrate: the input whose label scores are the model's prior (Zhao et al. 2021).
CONTENT_FREE = "N/A"


def label_words(label: str, names: dict[str, str] | None) -> str:
    """What a label is scored as: ``eval.label_names``' words, else its own name with
    ``.``, ``_`` and ``-`` as spaces."""
    if names and label in names:
        return str(names[label]).strip()
    for sep in "._-":
        label = label.replace(sep, " ")
    return " ".join(label.split())


def fill(template: str, text: str, words: str | None = None) -> str:
    """The template with the example (and the label's words) put in; the text is put in
    verbatim (braces in it are not format fields)."""
    out = template.replace("{text}", text)
    return out if words is None else out.replace("{label}", words)


def pick_shots(
    records: list[dict[str, str]], labels: list[str], per_label: int, seed: int
) -> list[dict[str, str]]:
    """``per_label`` training examples of each label (fewer where a label has fewer),
    drawn and then shuffled with ``seed``: the same shots for the same seed."""
    rng = random.Random(seed)
    chosen: list[dict[str, str]] = []
    for label in labels:
        pool = [r for r in records if r["label"] == label]
        chosen += rng.sample(pool, min(per_label, len(pool)))
    rng.shuffle(chosen)
    return chosen


def run_name(cfg: FinetuneConfig, kind: str) -> str:
    """``run.name``, or model-data-kind-<hash of what the scores depend on>."""
    if cfg.run.name:
        return cfg.run.name
    content: dict[str, Any] = {
        k: dataclasses.asdict(getattr(cfg, k)) for k in ("model", "data", "eval")
    }
    content["seed"] = cfg.train.seed
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode())
    return f"{cfg.model.name}-{cfg.data.name}-{kind}-{digest.hexdigest()[:8]}"


# --------------------------------------------------------------------------- causal LM
class LabelScorer:
    """Mean token log-probability of each label's words after one template (and,
    few-shot, a prefix of solved examples), for one example at a time."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str,
        words: list[str],
        *,
        prefix: str = "",
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        at = template.index("{label}")
        self.before, after = template[:at], template[at + len("{label}") :]
        # A word's leading space belongs to the word in BPE/SentencePiece vocabularies.
        space = ""
        if self.before.endswith(" "):
            self.before, space = self.before[:-1], " "
        conts = [tokenizer(space + w + after, add_special_tokens=False)["input_ids"] for w in words]
        width = max(len(c) for c in conts)
        pad = tokenizer.pad_token_id or 0
        self.conts = torch.tensor([c + [pad] * (width - len(c)) for c in conts])
        self.mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in conts])
        self.prefix_cache = None
        if prefix:
            ids = tokenizer(prefix)["input_ids"]
            with torch.no_grad():
                self.prefix_cache = model(input_ids=torch.tensor([ids]), use_cache=True).cache

    @torch.no_grad()
    def __call__(self, text: str) -> torch.Tensor:
        query = fill(self.before, text)
        ids = self.tokenizer(query, add_special_tokens=self.prefix_cache is None)["input_ids"]
        cache = copy.deepcopy(self.prefix_cache)  # None zero-shot
        out = self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        n_labels, width = self.conts.shape
        logp = torch.empty(n_labels, width)
        logp[:, 0] = out.logits[0, -1].float().log_softmax(-1)[self.conts[:, 0]]
        if width > 1:  # the labels' later tokens, all labels side by side on one cache
            cache = out.cache
            cache.batch_repeat_interleave(n_labels)
            more = self.model(input_ids=self.conts[:, :-1], cache=cache).logits
            logp[:, 1:] = (
                more.float().log_softmax(-1).gather(-1, self.conts[:, 1:, None]).squeeze(-1)
            )
        return (logp * self.mask).sum(1) / self.mask.sum(1)


def lm_scorer(
    cfg: FinetuneConfig, labels: list[str], shots: list[dict[str, str]]
) -> Callable[[str], torch.Tensor]:
    """Example text -> [labels] scores, averaged over the templates."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(cfg.model)
    model = _load(cfg, AutoModelForCausalLM, tokenizer)
    words = [label_words(label, cfg.eval.label_names) for label in labels]
    scorers = []
    for template in cfg.eval.templates:
        prefix = "".join(
            fill(
                template,
                _clip(r["text"], tokenizer, cfg),
                label_words(r["label"], cfg.eval.label_names),
            )
            + "\n\n"
            for r in shots
        )
        scorers.append(LabelScorer(model, tokenizer, template, words, prefix=prefix))

    def raw(text: str) -> torch.Tensor:
        return torch.stack([s(text) for s in scorers]).mean(0)

    # Contextual calibration: each label's score on a content-free input, subtracted.
    prior = raw(CONTENT_FREE) if cfg.eval.calibrate else torch.zeros(len(labels))

    def score(text: str) -> torch.Tensor:
        return raw(_clip(text, tokenizer, cfg)) - prior

    return score


def _clip(text: str, tokenizer: Any, cfg: FinetuneConfig) -> str:
    """The example cut to data.max_length tokens, as training would cut it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= cfg.data.max_length:
        return text
    return str(tokenizer.decode(ids[: cfg.data.max_length]))


# --------------------------------------------------------------------------- encoder
def embed(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens, L2-normalised: [N, hidden]."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tokenizer(
                texts[i : i + 32],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(rows)


def encoder_scorer(
    cfg: FinetuneConfig, labels: list[str], shots: list[dict[str, str]] | None
) -> Callable[[list[str]], torch.Tensor]:
    """Example texts -> [N, labels] logits: similarity to each label's words (zero-shot)
    or to each class centroid of the shots (few-shot)."""
    from transformers import AutoModel

    tokenizer = build_tokenizer(cfg.model)
    model = _load(cfg, AutoModel, tokenizer)
    n = cfg.data.max_length
    if shots is None:
        refs = embed(model, tokenizer, [label_words(x, cfg.eval.label_names) for x in labels], n)
    else:
        vectors = embed(model, tokenizer, [r["text"] for r in shots], n)
        index = torch.tensor([labels.index(r["label"]) for r in shots])
        refs = torch.stack([vectors[index == i].mean(0) for i in range(len(labels))])
        refs = F.normalize(refs, dim=-1)

    def score(texts: list[str]) -> torch.Tensor:
        return embed(model, tokenizer, texts, n) @ refs.T / TEMPERATURE

    return score


# --------------------------------------------------------------------------- CLIP
def clip_scorer(
    cfg: FinetuneConfig, labels: list[str], shots: list[dict[str, str]] | None
) -> Callable[[list[dict[str, str]]], torch.Tensor]:
    """Image records -> [N, labels] logits of an image-text model: the image embedding
    against each label's prompts (``eval.image_templates``, embedded and averaged), or
    against class centroids of the shots' images (few-shot); times the model's own
    logit scale, as CLIP scores."""
    from transformers import CLIPModel

    tokenizer = build_tokenizer(cfg.model)
    processor = build_image_processor(cfg.model, hf_config(cfg.model))
    model = _load(cfg, CLIPModel, tokenizer)
    images = tasks.TASKS["image_classification"]
    longest = int(model.config.text_config.max_position_embeddings)

    def image_vectors(records: list[dict[str, str]]) -> torch.Tensor:
        encoded = images.encode(records, processor, cfg.data, labels)
        rows = []
        with torch.no_grad():
            for i in range(0, len(encoded), 32):
                pixels = images.collate(encoded[i : i + 32], 0)["pixel_values"]
                out = model.get_image_features(pixel_values=pixels.to(model.dtype))
                rows.append(F.normalize(out.pooler_output.float(), dim=-1))
        return torch.cat(rows)

    if shots is None:
        refs = []
        with torch.no_grad():
            for label in labels:
                words = label_words(label, cfg.eval.label_names)
                prompts = [fill(t, "", words) for t in cfg.eval.image_templates]
                batch = tokenizer(
                    prompts, padding=True, truncation=True, max_length=longest, return_tensors="pt"
                )
                out = model.get_text_features(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                )
                refs.append(
                    F.normalize(F.normalize(out.pooler_output.float(), dim=-1).mean(0), dim=-1)
                )
        reference = torch.stack(refs)
    else:
        vectors = image_vectors(shots)
        index = torch.tensor([labels.index(r["label"]) for r in shots])
        centroids = torch.stack([vectors[index == i].mean(0) for i in range(len(labels))])
        reference = F.normalize(centroids, dim=-1)
    scale = float(model.logit_scale.exp())

    def score(records: list[dict[str, str]]) -> torch.Tensor:
        return scale * image_vectors(records) @ reference.T

    return score


def _load(cfg: FinetuneConfig, auto: Any, tokenizer: Any) -> Any:
    """The model with its pretraining head (a causal LM's) or none (an encoder's), in
    eval mode: the checkpoint's weights, or the seeded random init model.pretrained=false
    (and an architecture without weights) give."""
    config = hf_config(cfg.model, tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    dtype = getattr(torch, cfg.model.dtype)
    torch.manual_seed(cfg.train.seed)
    if cfg.model.pretrained and cfg.model.arch is None:
        model = auto.from_pretrained(weights_dir(cfg.model), config=config, dtype=dtype)
    else:
        # (a concrete class, CLIPModel, is built by calling it; an Auto class by from_config)
        build = getattr(auto, "from_config", None) or auto._from_config
        model = build(config, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------- the run
def check(cfg: FinetuneConfig, kind: str) -> str:
    """Every reason the baseline cannot run, before any model is read: returns how the
    model scores labels ("likelihood", "similarity" or "contrastive")."""
    if kind not in KINDS:
        raise ConfigError(
            "kind", f"{kind!r} is not a baseline that trains nothing; allowed: {list(KINDS)}"
        )
    if cfg.model.arch is None:
        resolve_source(cfg.model)
    try:
        family = family_of(hf_config(cfg.model))
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    scorable = SCORABLE[family.modality]
    if cfg.data.task not in scorable:
        raise ConfigError(
            "data.task",
            f"{kind} scores labels: {cfg.model.name} reads {family.modality}, so it needs "
            f"data.task={' or '.join(scorable)}, got {cfg.data.task}",
        )
    if family.encoder_decoder or (family.modality == "image" and not family.contrastive):
        form = "an image classifier" if family.modality == "image" else "an encoder-decoder"
        raise ConfigError(
            "model",
            f"{kind} scores labels with a causal LM (likelihood), a text encoder (embedding "
            f"similarity) or an image-text model such as CLIP; {cfg.model.name} is {form} "
            "with no text tower to read labels with",
        )
    if family.contrastive:
        return "contrastive"
    return "likelihood" if family.causal_lm else "similarity"


def run(cfg: FinetuneConfig, kind: str, *, run_dir: Path | None = None) -> dict[str, Any]:
    """Score the validation (and test) split with no training; returns the end record
    (``eval_*``, ``test_*``) and writes the run directory (reused when finished)."""
    how = check(cfg, kind)
    dataset = data_lib.load(cfg.data, tasks.get(cfg.model))  # a bad file fails here
    assert dataset.labels is not None
    labels = dataset.labels
    if run_dir is None:
        run_dir = Path(cfg.run.output_dir) / run_name(cfg, kind)
    run_dir = run_dir.resolve()
    done = next((r for r in runlog.read(run_dir) if r.get("event") == "end"), None)
    if done is not None:
        print(f"graft: {kind} already scored -> {run_dir}")
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))
    (run_dir / runlog.METRICS).unlink(missing_ok=True)  # an unfinished one starts again

    shots = (
        pick_shots(dataset.train, labels, cfg.eval.shots, cfg.train.seed)
        if kind == "few_shot"
        else []
    )
    method = {
        ("likelihood", "zero_shot"): "label likelihood after each template",
        ("likelihood", "few_shot"): f"label likelihood after {len(shots)} solved examples",
        ("similarity", "zero_shot"): "embedding similarity to each label's words",
        ("similarity", "few_shot"): f"embedding similarity to centroids of {len(shots)} examples",
        ("contrastive", "zero_shot"): "image-text similarity to each label's prompts",
        ("contrastive", "few_shot"): f"image similarity to centroids of {len(shots)} images",
    }[how, kind]
    splits = {"eval": dataset.eval, **({"test": dataset.test} if dataset.test else {})}
    print(
        f"graft: {kind} {cfg.model.name} on {cfg.data.name}: {method}; "
        + ", ".join(f"{len(v)} {k}" for k, v in splits.items())
        + f" examples, {len(labels)} labels -> {run_dir}"
    )
    log = runlog.RunLog(run_dir, enabled=True, cfg=cfg)
    log.log({"event": "start", "step": 0, "kind": kind, "method": method, "labels": len(labels)})
    started = time.time()
    score: Callable[[list[dict[str, str]]], torch.Tensor]
    if how == "likelihood":
        one = lm_scorer(cfg, labels, shots)

        def score(records: list[dict[str, str]]) -> torch.Tensor:
            return torch.stack([one(r["text"]) for r in records])
    elif how == "contrastive":
        score = clip_scorer(cfg, labels, shots if kind == "few_shot" else None)
    else:
        texts = encoder_scorer(cfg, labels, shots if kind == "few_shot" else None)

        def score(records: list[dict[str, str]]) -> torch.Tensor:
            return texts([r["text"] for r in records])

    end: dict[str, Any] = {"event": "end", "step": 0, "kind": kind}
    counted = 0
    task = tasks.TASKS["sequence_classification"]
    for split, records in splits.items():
        logits = score(records)
        target = torch.tensor([labels.index(r["label"]) for r in records])
        rows = torch.stack(
            [task.eval_sums(logits[i : i + 1], target[i : i + 1]) for i in range(len(records))]
        )
        torch.save(rows, run_dir / runlog.EXAMPLE_SUMS.format(split=split))
        end |= task.metrics(rows.sum(0), split)
        counted += len(records)
    end["examples_per_s"] = counted / max(time.time() - started, 1e-9)
    log.log(end)
    log.close()
    print(
        f"graft: {kind} done: "
        + ", ".join(f"{k}={v:.4g}" for k, v in end.items() if isinstance(v, float))
    )
    return end
