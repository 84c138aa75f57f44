"""data.source=hf (Hugging Face datasets on local files) and the tokenised-data cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conf.schema import ConfigError, DataConfig
from jobs import data, tasks
from jobs.data import cache
from jobs.models import byte_tokenizer

datasets = pytest.importorskip("datasets", reason="data.source=hf needs Hugging Face datasets")


def _rows(data_dir: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (data_dir / "cls.jsonl").read_text().splitlines()]


def _hf(path: Path | str, **kw) -> DataConfig:  # type: ignore[no-untyped-def]
    return DataConfig(name="t", source="hf", path=str(path), **kw)


def test_parquet_with_mapped_columns_splits_like_the_same_file(
    data_dir: Path, tmp_path: Path
) -> None:
    rows = _rows(data_dir)
    table = datasets.Dataset.from_list([{"review": r["text"], "stars": r["label"]} for r in rows])
    table.to_parquet(str(tmp_path / "reviews.parquet"))
    via_hf = data.load(_hf(tmp_path / "reviews.parquet", text_field="review", label_field="stars"))
    via_file = data.load(DataConfig(name="t", source="file", path=str(data_dir / "cls.jsonl")))
    assert via_hf.labels == via_file.labels == ["neg", "pos"]
    assert via_hf.train == via_file.train and via_hf.eval == via_file.eval


def test_a_saved_dataset_with_class_labels_and_its_own_splits(
    data_dir: Path, tmp_path: Path
) -> None:
    rows = _rows(data_dir)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    table = datasets.Dataset.from_list(
        [{"text": r["text"], "label": ["neg", "pos"].index(r["label"])} for r in rows],
        features=features,
    )
    datasets.DatasetDict(
        {"train": table.select(range(200)), "validation": table.select(range(200, 240))}
    ).save_to_disk(str(tmp_path / "saved"))
    loaded = data.load(_hf(tmp_path / "saved", hf_eval_split="validation"))
    assert loaded.labels == ["neg", "pos"]  # names, not ClassLabel's integers
    assert len(loaded.eval) == 40 and len(loaded.train) == 200
    assert loaded.eval[0] == {"text": rows[200]["text"], "label": rows[200]["label"]}
    with pytest.raises(ConfigError, match="data.hf_test_split.*no split 'test'.*'validation'"):
        data.load(_hf(tmp_path / "saved", hf_test_split="test"))


@pytest.mark.parametrize(
    ("name", "overrides", "key", "message"),
    [
        ("missing column", {"text_field": "body"}, "data.path", r"no column\(s\) \['body'\]"),
        ("blank field", {}, "data.path", r"row 1: field\(s\) \['text'\] are empty"),
        ("absent file", {"path": "./nope.parquet"}, "data.path", "does not exist"),
        ("offline hub id", {"path": "someone/some-dataset"}, "data.path", "could not load it"),
        ("hf key on a file", {"source": "file", "hf_split": "dev"}, "data.hf_split", "source=hf"),
    ],
)
def test_bad_hf_data_is_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    overrides: dict[str, str],
    key: str,
    message: str,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": "a", "label": "x"}) + "\n" + '{"text": " ", "label": "y"}\n'
    )
    cfg = _hf(path)
    with pytest.raises(ConfigError, match=message) as e:
        cfg = DataConfig(**{**cfg.__dict__, **overrides})
        cfg.check()
        data.load(cfg)
    assert e.value.key == key


def _cached_setup(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A fresh cache directory, the classification data, its task and a byte tokenizer."""
    monkeypatch.setenv("GRAFT_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(name="t", source="file", path=str(data_dir / "cls.jsonl"), max_length=16)
    return cfg, data.load(cfg), tasks.for_data(cfg), byte_tokenizer()


def test_the_token_cache_hits_on_the_same_input_and_misses_on_any_change(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, loaded, task, tokenizer = _cached_setup(data_dir, tmp_path, monkeypatch)
    fresh = task.encode(loaded.train, tokenizer, cfg, loaded.labels)
    before = dict(cache.stats)
    first = cache.encode(task, loaded.train, tokenizer, cfg, loaded.labels)
    again = cache.encode(task, loaded.train, tokenizer, cfg, loaded.labels)
    assert first == again == fresh
    assert cache.stats["misses"] == before["misses"] + 1
    assert cache.stats["hits"] == before["hits"] + 1
    assert len(list((tmp_path / "cache" / "tokenised").glob("*.pkl"))) == 1
    # another max_length, other records, other labels, another tokenizer: each its own entry
    longer = DataConfig(**{**cfg.__dict__, "max_length": 32})
    assert cache.encode(task, loaded.train, tokenizer, longer, loaded.labels) == task.encode(
        loaded.train, tokenizer, longer, loaded.labels
    )
    cache.encode(task, loaded.train[:-1], tokenizer, cfg, loaded.labels)
    cache.encode(task, loaded.train, tokenizer, cfg, list(reversed(loaded.labels)))
    other = byte_tokenizer()
    other.add_tokens(["pos"])
    cache.encode(task, loaded.train, other, cfg, loaded.labels)
    assert cache.stats["misses"] == before["misses"] + 5
    assert len(list((tmp_path / "cache" / "tokenised").glob("*.pkl"))) == 5


def test_a_damaged_cache_entry_is_encoded_again(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, loaded, task, tokenizer = _cached_setup(data_dir, tmp_path, monkeypatch)
    good = cache.encode(task, loaded.train, tokenizer, cfg, loaded.labels)
    (entry,) = (tmp_path / "cache" / "tokenised").glob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk or a kill
    assert cache.encode(task, loaded.train, tokenizer, cfg, loaded.labels) == good
    assert cache.encode(task, loaded.train, tokenizer, cfg, loaded.labels) == good


def test_an_image_column_becomes_files_the_image_task_reads(tmp_path: Path) -> None:
    """An ``Image`` feature's bytes (embedded in Parquet) are written once, by content,
    under $GRAFT_CACHE/hf-images and decode to the same pixels; a column of relative
    paths is resolved against the data's folder; a value that is no image is named."""
    import io

    import numpy as np
    from PIL import Image

    def png(colour: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (12, 10), colour).save(out, format="PNG")
        return out.getvalue()

    colours = {"red": (200, 10, 10), "blue": (10, 10, 200)}
    rows = [{"picture": png(colours[c]), "kind": c} for c in ["red", "blue"] * 6]
    features = datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["blue", "red"])}
    )
    table = datasets.Dataset.from_dict(
        {
            "picture": [{"bytes": r["picture"], "path": None} for r in rows],
            "kind": [["blue", "red"].index(r["kind"]) for r in rows],
        },
        features=features,
    )
    table.to_parquet(str(tmp_path / "pictures.parquet"))
    cfg = _hf(
        tmp_path / "pictures.parquet",
        task="image_classification",
        image_field="picture",
        label_field="kind",
        eval_fraction=0.25,
    )
    loaded = data.load(cfg)
    assert loaded.labels == ["blue", "red"]
    examples = loaded.train + loaded.eval
    assert len(examples) == 12 and len({e["image"] for e in examples}) == 2  # one file a content
    for e in examples:
        assert Path(e["image"]).parent.name == "hf-images"
        pixel = np.asarray(Image.open(e["image"]).convert("RGB"))[0, 0]
        assert tuple(pixel) == colours[e["label"]]

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), colours["red"]).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (8, 8), colours["blue"]).save(tmp_path / "imgs" / "b.png")
    listing = [{"file": f"imgs/{n}.png", "label": lab} for n, lab in (("a", "red"), ("b", "blue"))]
    datasets.Dataset.from_list(listing * 4).to_json(str(tmp_path / "listing.jsonl"))
    by_path = data.load(
        _hf(tmp_path / "listing.jsonl", task="image_classification", image_field="file")
    )
    assert {e["image"] for e in by_path.train + by_path.eval} == {
        str((tmp_path / "imgs" / n).resolve()) for n in ("a.png", "b.png")
    }

    datasets.Dataset.from_list([{"file": "imgs/missing.png", "label": "red"}] * 8).to_json(
        str(tmp_path / "broken.jsonl")
    )
    with pytest.raises(ConfigError, match=r"data.path.*missing.png: no such image file"):
        data.load(_hf(tmp_path / "broken.jsonl", task="image_classification", image_field="file"))
