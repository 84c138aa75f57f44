"""Job submission pieces that need no cluster: ids, entrypoints, what gets uploaded."""

from __future__ import annotations

import re
import shlex

from cluster import jobs


def test_job_ids_are_readable_unique_and_valid() -> None:
    one = jobs.job_id("tiny_llama-jsonl-full-1a2b3c4d", "finetune")
    assert one.startswith("graft-finetune-tiny_llama-jsonl-full-1a2b3c4d-")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", one)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", jobs.job_id("odd name/with:chars", "sweep"))


def test_entrypoint_passes_overrides_verbatim_and_joins_the_cluster() -> None:
    overrides = [
        "strategy=lora",
        "data.labels=[a,b]",
        "sweep.objectives=[{metric:eval_loss,mode:min}]",
    ]
    command = jobs.entrypoint("sweep", overrides)
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "cluster.cli", "sweep", "-q"]
    assert argv[5:8] == overrides and argv[-1] == "cluster.address=auto"
    # A user who names the cluster keeps it.
    assert "cluster.address=auto" not in jobs.entrypoint(
        "finetune", ["cluster.address=ray://h:10001"]
    )


def test_the_upload_leaves_out_environments_outputs_and_caches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for rel in (
        "jobs/a.py",
        ".venv/lib/big.so",
        ".git/objects/x",
        "runs/r/metrics.jsonl",
        "jobs/__pycache__/a.pyc",
        ".cache/graft/model.bin",
        "graft.egg-info/PKG-INFO",
    ):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    size, files = jobs.upload_size(tmp_path)
    assert (size, files) == (1000, 1)
    # .gitignore and .rayignore, at the top and below, as Ray's own upload reads them
    (tmp_path / ".gitignore").write_text("*.ckpt\n/data/\n")
    (tmp_path / "jobs" / ".rayignore").write_text("scratch/\n!keep.ckpt\n")
    for rel in ("model.ckpt", "data/train.jsonl", "jobs/scratch/x.py", "src/data/ok.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"y" * 10)
    size, files = jobs.upload_size(tmp_path)
    # jobs/a.py, src/data/ok.py (/data/ is anchored at the top), and the two ignore files
    assert files == 4 and size == 1000 + 10 + len("*.ckpt\n/data/\n") + len(
        "scratch/\n!keep.ckpt\n"
    )
    real, count = jobs.upload_size()
    assert count > 20 and real < jobs.MAX_UPLOAD_BYTES
