"""Using a trained run without Ray: `graft predict` on a known input, `graft merge-lora`
(the merged model's outputs equal the adapter model's), the model card in an export,
and the errors for what is not a finished run. The exports are made here the way
jobs/export.py lays them out, from tiny models, with plain transformers and peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cluster.cli import app
from jobs import card
from jobs.config import compose, to_yaml
from jobs.models import build
from tests.conftest import tiny_overrides

LABELS = ["neg", "pos"]


def _run_dir(root: Path, cfg: Any) -> Path:
    run = root / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


@pytest.fixture
def classifier_run(tmp_path: Path, data_dir: Path) -> Path:
    cfg = compose(tiny_overrides(data_dir, task="classification") + ["run.name=run"])
    model, tokenizer = build(cfg.model, labels=LABELS, seed=3)
    run = _run_dir(tmp_path, cfg)
    model.save_pretrained(run / "export")
    tokenizer.save_pretrained(run / "export")
    (run / "export" / "labels.json").write_text(json.dumps(LABELS))
    return run


def test_predict_gives_each_record_its_label_and_probabilities(
    classifier_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a fine day", "nothing works at all", "ok"]
    src = tmp_path / "new.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "pred.jsonl"
    result = CliRunner().invoke(
        app, ["predict", str(classifier_run), "--input", str(src), "-o", str(out), "-q",
              "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # every record, in order, with its fields
    # the same model in plain transformers, one record at a time
    model = AutoModelForSequenceClassification.from_pretrained(classifier_run / "export").eval()
    tok = AutoTokenizer.from_pretrained(classifier_run / "export")
    for text, row in zip(texts, rows, strict=True):
        with torch.no_grad():
            p = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0], -1)
        assert row["predicted_label"] == LABELS[int(p.argmax())]
        assert [row["probabilities"][k] for k in LABELS] == pytest.approx(p.tolist(), abs=1e-5)


def test_predict_reads_input_as_training_data_and_names_what_is_wrong(
    classifier_run: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "no text field"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(classifier_run), "--input", str(bad)])
    assert result.exit_code == 2 and "--input" in result.output and "text" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path), "--input", str(bad)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    (classifier_run / "export" / "config.json").unlink()
    for f in (classifier_run / "export").iterdir():
        f.unlink()
    result = runner.invoke(app, ["predict", str(classifier_run), "--input", str(bad)])
    assert result.exit_code == 2 and "run.export" in result.output


@pytest.fixture
def lora_run(tmp_path: Path, data_dir: Path) -> Path:
    """A causal LM's LoRA adapter (random B: the adapter changes the outputs) on a base
    saved beside it, as jobs/export.py writes a tiny model's."""
    import peft

    cfg = compose(tiny_overrides(data_dir) + ["strategy=lora", "run.name=run"])
    base, tokenizer = build(cfg.model, labels=None, seed=3)
    run = _run_dir(tmp_path, cfg)
    base.save_pretrained(run / "export" / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = str(run / "export" / "base")
    model.save_pretrained(run / "export" / "adapter")
    tokenizer.save_pretrained(run / "export" / "adapter")
    return run


def test_merge_lora_equals_the_adapter_model(lora_run: Path, tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge-lora", str(lora_run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(lora_run / "export" / "base")
    adapted = peft.PeftModel.from_pretrained(base, lora_run / "export" / "adapter").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(lora_run / "export" / "base")(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # (the adapter did change the model)
    # a full model has no adapter to merge
    (lora_run / "export" / "adapter" / "adapter_config.json").unlink()
    result = CliRunner().invoke(app, ["merge-lora", str(lora_run)])
    assert result.exit_code == 2 and "not a LoRA adapter" in result.output


def test_predict_generates_greedily_with_the_adapter(lora_run: Path, tmp_path: Path) -> None:
    from jobs import predict as predict_lib

    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "two plus two"}) + "\n")
    trained = predict_lib.load(lora_run)
    assert trained.kind == "adapter"
    records = predict_lib.read_input(trained, src)
    gen = predict_lib.Generation(max_new_tokens=5)
    [row] = list(predict_lib.predict(trained, records, generation=gen))
    # greedy by hand: the argmax token, five times
    ids = torch.tensor([predict_lib.prompt_ids(trained, "two plus two")])
    with torch.no_grad():
        for _ in range(5):
            nxt = trained.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == trained.tokenizer.eos_token_id:
                break
    prompt_len = len(predict_lib.prompt_ids(trained, "two plus two"))
    want = trained.tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()
    assert row["generation"] == want and row["prompt"] == "two plus two"


def test_an_export_carries_a_model_card(tmp_path: Path, data_dir: Path) -> None:
    from huggingface_hub import ModelCard

    cfg = compose(tiny_overrides(data_dir, task="classification") + ["run.name=r1"])
    run = tmp_path / "r1"
    (run / "export").mkdir(parents=True)
    card.record_command(run, ["/usr/bin/graft", "finetune", "train.lr=1e-3"])
    path = card.write(
        run / "export",
        cfg,
        metrics={"eval_accuracy": 0.875, "test_macro_f1": 0.8, "step": 12},
        base="sentence-transformers/all-MiniLM-L6-v2",
        labels=LABELS,
        adapter=False,
    )
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded.data.library_name == "transformers" and "graft" in loaded.data.tags
    assert "| eval_accuracy | 0.875 |" in loaded.text and "test_macro_f1" in loaded.text
    assert "graft finetune train.lr=1e-3" in loaded.text and "neg, pos" in loaded.text


def test_eval_scores_an_export_on_a_labelled_file(classifier_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [("a fine day", "pos"), ("nothing works at all", "neg"), ("ok", "pos"), ("bad", "neg")]
    src = tmp_path / "labelled.jsonl"
    src.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    result = CliRunner().invoke(app, ["eval", str(classifier_run), "--data", str(src)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{") :])
    model = AutoModelForSequenceClassification.from_pretrained(classifier_run / "export").eval()
    tok = AutoTokenizer.from_pretrained(classifier_run / "export")
    with torch.no_grad():
        predicted = [
            LABELS[int(model(**tok(t, return_tensors="pt")).logits.argmax())] for t, _ in rows
        ]
    right = sum(p == y for p, (_, y) in zip(predicted, rows, strict=True))
    assert scores["accuracy"] == pytest.approx(right / len(rows))
    assert sum(map(sum, scores["confusion"])) == len(rows)
    assert {c["support"] for c in scores["per_class"].values()} == {2}
    bad = tmp_path / "unknown.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "meh"}) + "\n")
    result = CliRunner().invoke(app, ["eval", str(classifier_run), "--data", str(bad)])
    assert result.exit_code == 2 and "meh" in result.output


def test_eval_gives_a_language_models_target_token_loss(lora_run: Path, tmp_path: Path) -> None:
    from jobs import predict as predict_lib
    from jobs.tasks.causal_lm import CausalLM

    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"prompt": "two plus two", "response": "four"}) + "\n")
    trained = predict_lib.load(lora_run)
    scores = predict_lib.evaluate_file(trained, src)
    [example] = CausalLM().encode(
        [{"prompt": "two plus two", "response": "four"}], trained.tokenizer, trained.cfg.data, None
    )
    with torch.no_grad():  # transformers' own shifted, masked loss on the same example
        want = trained.model(
            input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])
        ).loss
    assert scores["loss"] == pytest.approx(float(want), rel=1e-5)
