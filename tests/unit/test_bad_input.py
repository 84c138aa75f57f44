"""Bad input, as a new user types it: every case exits non-zero before Ray starts, names
the key, says what is allowed, prints no traceback and leaves no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app


def _instruct(path: Path, response: str = "an answer") -> Path:
    rows = [
        {"prompt": f"question {i}", "response": response if i == 3 else "ok"} for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _latin1(path: Path) -> Path:
    path.write_bytes(
        "".join(f'{{"text": "caf\xe9 {i}", "label": "a"}}\n' for i in range(20)).encode("latin-1")
    )
    return path


LLAMA = ["model=tiny_llama", "data=jsonl", "data.task=instruction", "data.max_length=32"]

# (overrides, given tmp_path; the key the message must name; words it must hold)
CASES = {
    "lora target matches nothing": (
        lambda t: ["strategy=lora", "strategy.lora.target_modules=[qery]"],
        "strategy.lora.target_modules",
        ["did you mean 'query'", "allowed"],
    ),
    "typo'd key": (lambda t: ["train.lrr=1e-3"], "train.lrr", ["did you mean `train.lr`"]),
    "typo'd key with a +": (
        lambda t: ["+train.lrr=1e-3"],
        "train.lrr",
        ["did you mean `train.lr`", "a + does not add keys"],
    ),
    "unknown key under a known group": (
        lambda t: ["+strategy.lora.rank=4"],
        "strategy.lora.rank",
        ["no such key", "alpha"],
    ),
    "max_length beyond the context": (
        lambda t: ["data.max_length=4096"],
        "data.max_length",
        ["context of 512", "allowed: 1..512"],
    ),
    "a file that is not UTF-8": (
        lambda t: ["data=jsonl", f"data.path={_latin1(t / 'latin1.jsonl')}"],
        "data.path",
        ["not UTF-8", "byte"],
    ),
    "a label named twice": (
        lambda t: ["data.labels=[a,b,a]"],
        "data.labels",
        ["['a'] more than once", "each label once"],
    ),
    "a response of only whitespace": (
        lambda t: [*LLAMA, f"data.path={_instruct(t / 'ws.jsonl', '   ')}"],
        "data.path",
        ["['response'] are empty or only whitespace", "needs text"],
    ),
    "an empty response": (
        lambda t: [*LLAMA, f"data.path={_instruct(t / 'empty.jsonl', '')}"],
        "data.path",
        ["['response'] are empty", "needs text"],
    ),
    "eval_every beyond max_steps": (
        lambda t: ["train.eval_every=500"],
        "train.eval_every",
        ["never", "allowed: 1..60"],
    ),
    "checkpoint_every beyond max_steps": (
        lambda t: ["train.checkpoint_every=61"],
        "train.checkpoint_every",
        ["allowed: 1..60"],
    ),
    "more workers than the machine": (
        lambda t: ["scaling.num_workers=64"],
        "scaling.num_workers",
        ["64 workers", "CPUs"],
    ),
    "a wrongly typed value": (
        lambda t: ["strategy=lora", "strategy.lora.r=eight"],
        "strategy.lora.r",
        ["'eight' is not an integer"],
    ),
    "a wrongly typed flag": (
        lambda t: ["run.export=maybe"],
        "run.export",
        ["true or false"],
    ),
    "a non-Ray server at the address": (
        lambda t: ["cluster.address=127.0.0.1:5432"],
        "cluster.address",
        ["not Ray", "GCS address"],
    ),
    "nothing at the address": (
        lambda t: ["cluster.address=127.0.0.1:1"],
        "cluster.address",
        ["nothing answers"],
    ),
    "an output directory that cannot be made": (
        lambda t: ["run.output_dir=/proc/graft-x"],
        "run.output_dir",
        ["cannot create /proc/graft-x", "allowed"],
    ),
    "a missing data file": (
        lambda t: ["data=jsonl", f"data.path={t / 'none.jsonl'}"],
        "data.path",
        ["does not exist"],
    ),
    "a negative learning rate": (lambda t: ["train.lr=-1"], "train.lr", ["must be > 0"]),
    "max_failures below -1": (
        lambda t: ["train.max_failures=-3"],
        "train.max_failures",
        ["-1 (no limit)"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_ray(case: str, tmp_path: Path) -> None:
    import ray

    make, key, words = CASES[case]
    out = tmp_path / "runs"
    overrides = make(tmp_path)
    if not any(o.startswith("run.output_dir=") for o in overrides):
        overrides.append(f"run.output_dir={out}")
    connected = ray.is_initialized()  # (another test in this process may have started one)
    result = CliRunner().invoke(app, ["finetune", "-q", *overrides])
    said = " ".join((result.stdout + result.stderr).split())  # (rich wraps long lines)
    assert result.exit_code == 2, said
    assert key in said and all(w in said for w in words), said
    assert (
        "Traceback" not in said
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    assert not out.exists()  # no run directory, nor its parent, left behind
    assert ray.is_initialized() == connected  # the command started no Ray
