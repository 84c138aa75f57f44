"""What the tokenised-data cache saves a worker at start-up (jobs/data/cache.py).

    python tests/benchmarks/bench_token_cache.py        # or: make bench-token-cache

Real data and real tokenizers: WordNet's noun glosses (82k, 26 supersenses) through
MiniLM's WordPiece tokenizer (classification), and the WordNet instruction pairs through
SmolLM2's tokenizer and chat template (instruction data, where installed). For each:
the encode a worker does without the cache (a miss: encode and write the entry), and
with it (a hit: read the entry), timed in one process, each three times (the median).
Writes runs/bench/token_cache.json and token_cache.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

from jobs import data as data_lib  # noqa: E402
from jobs import tasks  # noqa: E402
from jobs.config import compose  # noqa: E402
from jobs.data import cache  # noqa: E402
from jobs.models import build_tokenizer  # noqa: E402

CASES = {
    "minilm-wordnet-supersense": ["model=minilm", "data=wordnet_supersense"],
    "smollm2-wordnet-instruct": ["model=smollm2_135m", "data=wordnet_instruct"],
}


def measure(overrides: list[str], repeats: int) -> dict[str, float | int]:
    cfg = compose(overrides)
    dataset = data_lib.load(cfg.data)
    task = tasks.for_data(cfg.data)
    tokenizer = build_tokenizer(cfg.model)
    misses, hits = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["GRAFT_CACHE"] = tmp
            t = time.perf_counter()
            first = cache.encode(task, dataset.train, tokenizer, cfg.data, dataset.labels)
            misses.append(time.perf_counter() - t)
            t = time.perf_counter()
            again = cache.encode(task, dataset.train, tokenizer, cfg.data, dataset.labels)
            hits.append(time.perf_counter() - t)
            assert again == first
            size = sum(p.stat().st_size for p in Path(tmp, "tokenised").glob("*.pkl"))
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {
        "examples": len(dataset.train),
        "encoded": len(first),
        "miss_s": round(miss, 3),
        "hit_s": round(hit, 3),
        "saved_s": round(miss - hit, 3),
        "speedup": round(miss / hit, 1),
        "entry_mb": round(size / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    for name, overrides in CASES.items():
        try:
            results[name] = measure(overrides, args.repeats)
        except Exception as e:  # SmolLM2 needs `make install-models`: say so, go on
            results[name] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
        print(name, results[name], flush=True)
    (out / "token_cache.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| data, tokenizer | train examples | encoded | encode (miss) s | load (hit) s | saved per start s | entry MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if isinstance(r, dict) and "miss_s" in r:
            lines.append(
                f"| {name} | {r['examples']} | {r['encoded']} | {r['miss_s']} | {r['hit_s']} "
                f"| {r['saved_s']} ({r['speedup']}x) | {r['entry_mb']} |"
            )
        else:
            lines.append(f"| {name} | skipped: {r} | | | | | |")
    (out / "token_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
