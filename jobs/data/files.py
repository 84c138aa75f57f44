"""Readers for user data files: JSONL, CSV and plain text. Errors name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conf.schema import ConfigError, DataConfig


def check_record(
    record: object, where: str, fields: tuple[str, ...], key: str, forbid: tuple[str, ...] = ()
) -> dict[str, str]:
    if not isinstance(record, dict):
        raise ConfigError(key, f"{where}: expected a JSON object, got {type(record).__name__}")
    present = [f for f in forbid if record.get(f) not in (None, "")]
    if present:
        raise ConfigError(key, f"{where}: has field(s) {present}, which this file must not have")
    missing = [f for f in fields if f not in record or record[f] is None]
    if missing:
        raise ConfigError(
            key, f"{where}: missing field(s) {missing}; the record has {sorted(record)}"
        )
    blank = [f for f in fields if not str(record[f]).strip()]
    if blank:
        raise ConfigError(
            key,
            f"{where}: field(s) {blank} are empty or only whitespace; every field "
            f"{list(fields)} needs text",
        )
    return {f: str(record[f]) for f in fields}


# (field, value): read only the rows whose field has that value.
Select = tuple[str, str] | None


def _selected(record: object, where: str, select: Select, key: str) -> bool:
    """Whether a record is one of the selected rows (``select`` = (field, value), e.g. a
    multi-task file's task field); every record must have the field."""
    if select is None or not isinstance(record, dict):
        return True
    field, value = select
    if record.get(field) in (None, ""):
        raise ConfigError(key, f"{where}: missing field {field!r}; the record has {sorted(record)}")
    return str(record[field]) == value


def read_jsonl(
    path: Path,
    cfg: DataConfig,
    fields: tuple[str, ...],
    key: str,
    forbid: tuple[str, ...] = (),
    select: Select = None,
) -> list[dict[str, str]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(key, f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            where = f"{path}:{lineno}"
            if _selected(record, where, select, key):
                records.append(check_record(record, where, fields, key, forbid))
    return records


def read_csv(
    path: Path,
    cfg: DataConfig,
    fields: tuple[str, ...],
    key: str,
    forbid: tuple[str, ...] = (),
    select: Select = None,
) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(fields) + ([select[0]] if select else [])
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            raise ConfigError(
                key,
                f"{path}:1: header must name columns {columns}, got {reader.fieldnames}",
            )
        # Line numbers count the header as line 1.
        return [
            check_record(row, f"{path}:{reader.line_num}", fields, key, forbid)
            for row in reader
            if _selected(row, f"{path}:{reader.line_num}", select, key)
        ]


def read_text(
    path: Path,
    cfg: DataConfig,
    fields: tuple[str, ...],
    key: str,
    forbid: tuple[str, ...] = (),
    select: Select = None,
) -> list[dict[str, str]]:
    if select is not None:
        raise ConfigError(key, f"{path}: a .txt file has no {select[0]!r} field; use JSONL or CSV")
    if fields != (cfg.text_field,):
        raise ConfigError(key, f"{path}: a .txt file holds plain text; it needs data.task=text")
    # Paragraphs; encoding later packs them into max_length blocks.
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return [{cfg.text_field: p} for p in paragraphs if p]


READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv, ".txt": read_text}


def read(
    name: str,
    cfg: DataConfig,
    fields: tuple[str, ...],
    *,
    key: str = "data.path",
    forbid: tuple[str, ...] = (),
    select: Select = None,
) -> list[dict[str, str]]:
    """The records of one file (``key`` is the config key that named it, for errors);
    ``fields`` are the ones the task needs, ``forbid`` ones a record must not have (an
    unlabelled file's label); with ``select=(field, value)`` only the rows whose field
    has that value (the others need not have the task's fields)."""
    path = Path(name).expanduser()
    if cfg.image_field in fields:  # the task reads images: a folder or a listing of paths
        return _read_images(path, cfg, fields, key=key, forbid=forbid, select=select)
    return _read_file(path, name, cfg, fields, key=key, forbid=forbid, select=select)


def _read_file(
    path: Path,
    name: str,
    cfg: DataConfig,
    fields: tuple[str, ...],
    *,
    key: str,
    forbid: tuple[str, ...],
    select: Select,
) -> list[dict[str, str]]:
    if not path.is_file():
        raise ConfigError(key, f"{name} does not exist or is not a file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            key, f"{path.name}: unknown format {path.suffix!r}; allowed: {', '.join(READERS)}"
        )
    try:
        records = reader(path, cfg, fields, key, forbid, select)
    except UnicodeDecodeError as e:
        raise ConfigError(
            key,
            f"{path}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at offset "
            f"{e.start}); allowed: UTF-8 encoded {', '.join(READERS)} files (re-encode it, "
            "e.g. iconv -f latin1 -t utf-8)",
        ) from None
    if not records:
        which = f" with {select[0]}={select[1]!r}" if select else ""
        raise ConfigError(key, f"{path} holds no examples{which}")
    return records


def _read_images(
    path: Path,
    cfg: DataConfig,
    fields: tuple[str, ...],
    *,
    key: str,
    forbid: tuple[str, ...],
    select: Select,
) -> list[dict[str, str]]:
    """An image folder (the label is the sub-folder) or a JSONL/CSV listing of image
    paths; every image opened, so a bad one is named here (before Ray starts)."""
    from jobs.data import images

    if path.is_dir():
        if select is not None:
            raise ConfigError(key, f"{path}: an image folder has no {select[0]!r} field")
        records = [
            {cfg.image_field: r["image"], cfg.label_field: r["label"]}
            for r in images.read_folder(path, key=key)
        ]
        if cfg.label_field in forbid:  # unlabelled images: the folder names are labels
            raise ConfigError(
                key, f"{path}: an image folder labels every image; give a listing without labels"
            )
        records = [{f: r[f] for f in fields if f in r} for r in records]
    else:
        if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise ConfigError(
                key,
                f"{path}: images come from a folder (root/<label>/*.png) or a .jsonl/.csv "
                f"listing with a {cfg.image_field!r} column",
            )
        records = _read_file(path, str(path), cfg, fields, key=key, forbid=forbid, select=select)
        records = images.resolve(records, path, cfg.image_field)
    images.check_images([{"image": r[cfg.image_field]} for r in records], key=key)
    return records
