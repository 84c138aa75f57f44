"""The CLI that explains itself: graft --version, ls, cp and check (every preflight
check without Ray), through typer's test runner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cluster.cli import CONF, app
from tests.conftest import tiny_overrides

runner = CliRunner()


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"graft {version('graft')}"


def test_ls_lists_each_group_and_its_options_but_no_schema() -> None:
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "lora" in lines["strategy"] and "zero3" in lines["deepspeed"]
    assert "+experiment=NAME" in lines["experiment"] and "smollm2_lora" in lines["experiment"]
    assert "_schema" not in result.output


def test_cp_copies_a_shipped_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "mine.yaml"
    assert runner.invoke(app, ["cp", "strategy/lora", str(target)]).exit_code == 0
    assert target.read_text() == (CONF / "strategy" / "lora.yaml").read_text()
    again = runner.invoke(app, ["cp", "strategy/lora", str(target)])
    assert again.exit_code == 2 and "--force" in again.output
    bad = runner.invoke(app, ["cp", "strategy/lorra", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "strategy/lora" in bad.output  # (the allowed ones listed)


def test_check_runs_every_preflight_check_without_ray(tmp_path: Path, data_dir: Path) -> None:
    import ray

    good = [*tiny_overrides(data_dir), f"run.output_dir={tmp_path}", "run.name=checked"]
    before = ray.is_initialized()
    result = runner.invoke(app, ["check", *good])
    assert result.exit_code == 0 and "every check passed" in result.output, result.output
    assert ray.is_initialized() == before and not (tmp_path / "checked").exists()
    # a LoRA target that matches nothing in the model: named before Ray
    result = runner.invoke(
        app, ["check", *good, "strategy=lora", "strategy.lora.target_modules=[nope]"]
    )
    assert result.exit_code == 2 and "strategy.lora.target_modules" in result.output
    assert not (tmp_path / "checked").exists()


def test_plan_of_a_model_alone_takes_the_data_task_from_the_model() -> None:
    """`graft plan model=llama3_8b` is the first thing a user types: no data file, so
    the data task follows the model's instead of failing on the default data's."""
    result = runner.invoke(app, ["plan", "model=llama3_8b", "--json"])
    assert "data.task=instruction" in result.output  # (said, on stderr)
    assert "needs model.task" not in result.output
    assert result.exit_code in (0, 1)  # fits or not: a plan, not a config error


def test_data_preview_shows_what_trains(data_dir: Path) -> None:
    import json

    lm = runner.invoke(app, ["data", "preview", *tiny_overrides(data_dir), "--json"])
    assert lm.exit_code == 0, lm.output
    shown = json.loads(lm.output[lm.output.index("{") :])
    first = shown["examples"][0]
    # instruction tuning: the prompt is masked, only the response (and EOS) trains
    assert first["record"]["response"] in first["trained_text"]
    assert first["record"]["prompt"] not in first["trained_text"]
    assert shown["lengths"]["max"] >= shown["lengths"]["p50"] > 0
    cls = runner.invoke(app, ["data", "preview", *tiny_overrides(data_dir, task="classification")])
    assert cls.exit_code == 0 and "labels (train):" in cls.output and "label: " in cls.output
    bad = runner.invoke(
        app, ["data", "preview", *tiny_overrides(data_dir), "data.path=/nope.jsonl"]
    )
    assert bad.exit_code == 2 and "data.path" in bad.output


def test_shell_completion_offers_commands_choices_and_config_options() -> None:
    """What bash's completion script asks graft (typer/click's protocol), in a real process."""
    import os
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_GRAFT_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }
        code = "from cluster.cli import app; app(prog_name='graft')"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        return out.stdout.split()

    assert complete("graft das") == ["dashboard"]
    assert complete("graft dashboard --kind ") == ["auto", "optuna", "tensorboard"]
    assert complete("graft finetune strategy=l") == ["strategy=lora"]
    assert "+experiment=" in complete("graft finetune +exp")
    assert complete("graft submit sw") == ["sweep"]
    # and the help shows the choices of a kind-like argument
    assert "{finetune|sweep}" in runner.invoke(app, ["submit", "--help"]).output
    script = runner.invoke(app, ["--show-completion", "bash"])
    assert script.exit_code == 0 and "_GRAFT_COMPLETE=complete_bash" in script.output


def test_push_checks_everything_it_can_before_the_network(tmp_path: Path) -> None:
    """Up to the point where the network is needed: a run without an export, a bad repo
    id and HF_HUB_OFFLINE are refused with the key named; with the network allowed, an
    unreachable Hub endpoint is one clear line, not a traceback."""
    import socket

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "README.md").write_text("# card\n")

    def push(*args: str, **env: str) -> tuple[int, str]:
        result = runner.invoke(app, ["push", *args], env=env)
        return result.exit_code, result.output

    code, out = push(str(tmp_path), "--repo", "me/model")
    assert code == 2 and "RUN" in out and "no export/" in out
    code, out = push(str(run), "--repo", "not a repo!")
    assert code == 2 and "--repo" in out and "not a Hub repo id" in out
    code, out = push(str(run), "--repo", "me/model", "--merged")
    assert code == 2 and "graft merge-lora" in out
    code, out = push(str(run), "--repo", "me/model", HF_HUB_OFFLINE="1")
    assert code == 2 and "HF_HUB_OFFLINE" in out
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = push(
        str(run),
        "--repo",
        "me/model",
        "--token",
        "hf_x",
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
    )
    assert code == 2 and "could not reach the Hub" in out and "Traceback" not in out


def test_info_shows_hydras_search_path_and_the_options_each_group_took() -> None:
    result = runner.invoke(app, ["finetune", "--info", "strategy=lora", "deepspeed=zero3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "pkg://conf" in out and "strategy=lora" in out and "deepspeed=zero3" in out
    assert "model=minilm" in out  # a default the user did not override
    sweep = runner.invoke(app, ["sweep", "--info"])
    assert sweep.exit_code == 0 and "Config: sweep.yaml" in sweep.output
    typo = runner.invoke(app, ["finetune", "--info", "train.lrr=1"])
    assert typo.exit_code == 2 and "train.lr" in typo.output


def test_data_preview_of_an_hf_image_column_names_its_files(tmp_path: Path) -> None:
    """An image task's examples are their files and labels (not `input: None`)."""
    import io

    import datasets
    from PIL import Image

    def png(colour: tuple[int, int, int]) -> dict[str, object]:
        out = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(out, format="PNG")
        return {"bytes": out.getvalue(), "path": None}

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["blue", "red"])}
    )
    datasets.Dataset.from_dict(
        {
            "img": [png((200, 0, 0) if i % 2 else (0, 0, 200)) for i in range(20)],
            "label": [i % 2 for i in range(20)],
        },
        features=features,
    ).to_parquet(str(tmp_path / "pics.parquet"))
    shown = runner.invoke(
        app,
        [
            "data",
            "preview",
            "model=tiny_vit",
            "data=jsonl",
            "data.source=hf",
            f"data.path={tmp_path / 'pics.parquet'}",
            "data.task=image_classification",
            "data.image_field=img",
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert "labels (train): blue=" in shown.output and "input: None" not in shown.output
    assert "--- example 0 (image)\nimage: " in shown.output and ".png\nlabel: " in shown.output
