"""Tokenised examples cached on disk, so a worker, a restarted gang or a sweep's next
trial loads what an earlier start encoded instead of tokenising the data again.

    $GRAFT_CACHE/tokenised/<key>.pkl      (GRAFT_CACHE defaults to ~/.cache/graft)

The key is a hash of everything the encoded examples depend on: the records
themselves, the task and the data settings it reads (``data.task``, ``max_length``,
the label list), the tokenizer (its serialised vocabulary and merges, special tokens,
chat template) and the source of the task's encoder, so a change to any of them is a
miss, never a stale hit. Entries are written to a file of their own and renamed into
place: workers that encode together leave one whole entry, never a part. Image tasks
are not cached (their examples are paths; pixels are made per batch). ``rm -r
$GRAFT_CACHE/tokenised`` clears it; ``GRAFT_TOKEN_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import threading
from pathlib import Path
from typing import Any

from conf.schema import DataConfig

# Bumped when the entry format changes.
FORMAT = 1
# Stats of this process, for the run's log and the benchmark (hits, misses, seconds saved).
stats = {"hits": 0, "misses": 0}


def directory() -> Path:
    from jobs.models import cache_dir

    return cache_dir() / "tokenised"


def enabled() -> bool:
    return os.environ.get("GRAFT_TOKEN_CACHE", "1") not in ("0", "false", "no")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What a tokenizer turns text into depends on: its type, its serialised model
    (vocabulary, merges, normalisers, post-processor), its special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(repr(tokenizer).encode())
    for attr in (
        "chat_template",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "padding_side",
        "truncation_side",
        "add_bos_token",
        "add_eos_token",
    ):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    return h.hexdigest()


def key(
    task: Any, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
) -> str:
    h = hashlib.sha256(f"graft-tokenised-{FORMAT}".encode())
    h.update(type(task).__qualname__.encode())
    for module in (type(task).__module__, "jobs.tasks.common"):  # an edited encoder: a miss
        source = getattr(sys.modules.get(module), "__file__", None)
        if source:
            h.update(Path(source).read_bytes())
    h.update(json.dumps([data.task, data.max_length, labels], default=str).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(records, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def encode(
    task: Any, records: list[dict[str, str]], tokenizer: Any, data: DataConfig, labels: Any
) -> list[dict[str, Any]]:
    """``task.encode(records, tokenizer, data, labels)``, from the cache when it holds it."""
    if not enabled() or getattr(task, "modality", "text") != "text" or not records:
        return list(task.encode(records, tokenizer, data, labels))
    path = directory() / f"{key(task, records, tokenizer, data, labels)}.pkl"
    try:
        with path.open("rb") as f:
            encoded = pickle.load(f)
        stats["hits"] += 1
        return list(encoded)
    except FileNotFoundError:
        pass
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError):
        path.unlink(missing_ok=True)  # a damaged entry: encode again, write it anew
    encoded = list(task.encode(records, tokenizer, data, labels))
    stats["misses"] += 1
    _write(path, encoded)
    return encoded


def _write(path: Path, encoded: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("wb") as f:
            pickle.dump(encoded, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
    except OSError:  # a read-only or full cache costs the saving, never the run
        pass
