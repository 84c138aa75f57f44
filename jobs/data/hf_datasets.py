"""data.source=hf: records through Hugging Face ``datasets``.

    graft finetune data=jsonl data.source=hf data.path=reviews.parquet data.text_field=review

A JSON/JSONL, CSV, Parquet or Arrow file (or a folder of them) goes through
``load_dataset``, a folder written by ``save_to_disk`` through ``load_from_disk``; any
other value is a hub id, read where the network allows (with ``HF_HUB_OFFLINE=1`` that
is an error naming ``data.path``). Columns map to the task's fields through
``data.text_field`` / ``label_field`` / ``prompt_field`` / ``response_field`` /
``image_field``; a ``ClassLabel`` column gives its label names, not its integers, and an
``Image`` column (or a column of paths) the image files the image task reads. Rows then pass the same
checks as a file's records (a missing or blank field is named with its row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.schema import ConfigError, DataConfig
from jobs.data.files import check_record

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# What a save_to_disk folder holds (a DatasetDict, or one Dataset).
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def read(
    cfg: DataConfig, fields: tuple[str, ...], *, split: str, split_key: str
) -> list[dict[str, str]]:
    """The records of one split; ``split_key`` is the config key that named the split."""
    assert cfg.path is not None
    table = _split(_open(cfg), cfg, split, split_key)
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise ConfigError(
            "data.path",
            f"{cfg.path} [{split}]: no column(s) {missing}; its columns: {table.column_names} "
            "(map yours with data.text_field / label_field / prompt_field / response_field / "
            "image_field)",
        )
    names = {f: table.features[f].names for f in fields if hasattr(table.features[f], "int2str")}
    image = cfg.image_field if cfg.image_field in fields else None  # (the task reads images)
    if image is not None and type(table.features[image]).__name__ == "Image":
        import datasets

        table = table.cast_column(image, datasets.Image(decode=False))  # {path, bytes}
    records = []
    for i, row in enumerate(table.select_columns(list(fields))):
        where = f"{cfg.path} [{split}] row {i}"
        for f, labels in names.items():
            if isinstance(row[f], int) and 0 <= row[f] < len(labels):
                row[f] = labels[row[f]]
        if image is not None and row[image] is not None:
            row[image] = image_file(row[image], cfg, where)
        records.append(check_record(row, where, fields, "data.path"))
    if not records:
        raise ConfigError(split_key, f"{cfg.path} [{split}] holds no examples")
    if image is not None:
        from jobs.data import images

        images.check_images([{"image": r[image]} for r in records], key="data.path")
    return records


def image_file(value: Any, cfg: DataConfig, where: str) -> str:
    """A path the image task reads, for an image column's value: an ``Image`` feature's
    bytes (Parquet and Arrow embed them) are written once to
    $GRAFT_CACHE/hf-images/<content hash> (atomically: every worker reads the data); its
    path, or a string column's, is taken as it is, relative to the data's folder."""
    if isinstance(value, dict) and value.get("bytes"):
        import hashlib
        import io
        import os

        from PIL import Image, UnidentifiedImageError

        from jobs.models import cache_dir

        data = value["bytes"]
        try:
            with Image.open(io.BytesIO(data)) as opened:
                kind = (opened.format or "img").lower()
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError("data.path", f"{where}: not a readable image ({e})") from None
        folder = cache_dir() / "hf-images"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{kind}"
        if not target.is_file():
            partial = target.with_name(f".{target.name}.{os.getpid()}")
            partial.write_bytes(data)
            partial.replace(target)
        return str(target)
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(
            "data.path",
            f"{where}: column {cfg.image_field!r} holds no image (neither bytes nor a path)",
        )
    assert cfg.path is not None
    root = Path(cfg.path).expanduser()
    root = root if root.is_dir() else root.parent
    return str((root / Path(path).expanduser()).resolve())


def _open(cfg: DataConfig) -> Any:
    import datasets

    assert cfg.path is not None
    path = Path(cfg.path).expanduser()
    allowed = (
        f"allowed: a {'/'.join(BUILDERS)} file, a folder of them, a save_to_disk folder, "
        "or a hub id (needs the network)"
    )
    if path.is_file() and path.suffix.lower() not in BUILDERS:
        raise ConfigError("data.path", f"{path.name}: unknown format {path.suffix!r}; {allowed}")
    local = path.exists() or cfg.path.startswith(("/", ".", "~")) or path.suffix in BUILDERS
    if local and not path.exists():
        raise ConfigError("data.path", f"{cfg.path} does not exist; {allowed}")
    # Progress bars of datasets' own would interleave with graft's output.
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
            return datasets.load_from_disk(str(path))
        if path.is_file():
            return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path))
        return datasets.load_dataset(str(path) if local else cfg.path, name=cfg.hf_name)
    except Exception as e:  # datasets raises many kinds; the user needs the key and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            "data.path",
            f"{cfg.path}: Hugging Face datasets could not load it ({reason}); {allowed}",
        ) from None


def _split(data: Any, cfg: DataConfig, split: str, split_key: str) -> Any:
    splits = list(data.keys()) if hasattr(data, "keys") else None
    if splits is None:  # one saved Dataset: it is the only split
        if split != "train":
            raise ConfigError(
                split_key, f"{cfg.path} is a single dataset without splits; {split!r} is not in it"
            )
        return data
    if split not in splits:
        raise ConfigError(split_key, f"{cfg.path} has no split {split!r}; its splits: {splits}")
    return data[split]
