"""Config composition and validation: every shipped config composes, every bad value is
rejected with its key named, before Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conf.schema import ConfigError, FinetuneConfig
from jobs.config import compose, run_name
from jobs.preflight import preflight
from tests.conftest import tiny_overrides

CONF = Path(__file__).parents[2] / "conf"
# Values a group leaves MISSING (???) on purpose, and what to fill in to compose it.
NEEDS = {
    ("model", "hf"): ["model.path=/tmp"],
    ("data", "jsonl"): ["data.path=/tmp/x.jsonl"],
    ("cluster", "remote"): ["cluster.address=127.0.0.1:1"],
    # Config-only LLaMA 3 entries are bf16 and causal LMs.
    ("model", "llama3_8b"): ["deepspeed.bf16=true", "data=wordnet_instruct"],
    ("model", "llama3_70b"): ["deepspeed.bf16=true", "data=wordnet_instruct"],
    # Vision models read an image folder.
    ("model", "tiny_vit"): ["data=image_folder", "data.path=/tmp/images"],
    ("model", "tiny_resnet"): ["data=image_folder", "data.path=/tmp/images"],
    ("model", "efficientnet_lite0"): ["data=image_folder", "data.path=/tmp/images"],
    ("model", "tiny_t5"): ["data=wordnet_instruct"],
    ("model", "tiny_clip"): ["data=image_folder", "data.path=/tmp/images"],
    ("data", "image_folder"): ["data.path=/tmp/images", "model=tiny_vit"],
}
TASK_OF_DATA = {"wordnet_instruct": "smollm2_135m"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"),
    [
        (g, o)
        for g in ("model", "data", "strategy", "deepspeed", "scaling", "cluster")
        for o in _options(g)
    ],
)
def test_every_shipped_group_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    if group == "model" and option in ("tiny_llama", "smollm2_135m", "hf"):
        overrides += ["data=wordnet_instruct"]  # a causal LM needs an LM task
    if group == "data" and option == "wordnet_instruct":
        overrides += ["model=tiny_llama"]
    cfg = compose(overrides)
    assert isinstance(cfg, FinetuneConfig)
    assert getattr(cfg, group) is not None


def test_default_config_is_the_demo() -> None:
    cfg = compose([])
    assert (cfg.model.name, cfg.data.name, cfg.model.pretrained) == ("minilm", "stdlib_docs", True)
    assert cfg.cluster.address is None  # embedded


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert cfg.model.name == "smollm2_135m" and cfg.strategy.name == "lora"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["deepspeed.stage=4"], "deepspeed.stage"),
        (["strategy=lora", "strategy.lora.r=0"], "strategy.lora.r"),
        (["strategy=lora", "strategy.lora.r=-2"], "strategy.lora.r"),
        (["train.lr=0"], "train.lr"),
        (["train.lr=-1e-4"], "train.lr"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["strategy.lr_ratio=0"], "strategy.lr_ratio"),
        (["strategy.lr_ratio=1.5"], "strategy.lr_ratio"),
        (["strategy.name=partial"], "strategy.name"),
        (["train.schedule=exp"], "train.schedule"),
        (["train.warmup_steps=500"], "train.warmup_steps"),
        (["scaling.num_workers=0"], "scaling.num_workers"),
        (["scaling.gpus_per_worker=-1"], "scaling.gpus_per_worker"),
        (
            ["strategy=freeze_depth", "strategy.num_trainable_blocks=-1"],
            "strategy.num_trainable_blocks",
        ),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.max_grad_norm=-1"], "train.max_grad_norm"),
        (["deepspeed.offload_params=true"], "deepspeed.offload_params"),
        (["train.early_stopping.metric=f1"], "train.early_stopping.metric"),
        (["data.eval_fraction=1.0"], "data.eval_fraction"),
        (["model.dtype=float16"], "model.dtype"),
        (["cluster.dashboard_port=6379"], "cluster.dashboard_port"),
        (["run.name=../elsewhere"], "run.name"),
        (["model=tiny_llama"], "model.task"),  # a causal LM on a classification set
    ],
)
def test_bad_values_are_rejected_with_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert info.value.key == key
    assert str(info.value).startswith(key)


@pytest.mark.parametrize(
    "override", ["train.nope=1", "model=no_such_model", "deepspeed.stage=three"]
)
def test_unknown_keys_and_wrong_types_fail_composition(override: str) -> None:
    # (graft's own check names typo'd keys and wrong types before Hydra: ConfigError)
    with pytest.raises((HydraException, OmegaConfBaseException, ConfigError)) as info:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(info.value)


def _preflight_error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        preflight(compose(overrides))
    return info.value


def test_freeze_depth_beyond_the_model_is_rejected(data_dir: Path) -> None:
    err = _preflight_error(
        tiny_overrides(data_dir) + ["strategy=freeze_depth", "strategy.num_trainable_blocks=5"]
    )
    assert (
        err.key == "strategy.num_trainable_blocks" and "4 blocks" in str(err) and "0..4" in str(err)
    )


def test_missing_model_path_is_rejected(data_dir: Path) -> None:
    err = _preflight_error(
        [
            "model=hf",
            "model.path=/no/such/model",
            "model.task=sequence_classification",
            "data=jsonl",
            f"data.path={data_dir / 'cls.jsonl'}",
        ]
    )
    assert err.key == "model.path" and "/no/such/model" in str(err)


def test_missing_data_file_is_rejected() -> None:
    err = _preflight_error(["model=tiny_bert", "data=jsonl", "data.path=/no/such/file.jsonl"])
    assert err.key == "data.path" and "/no/such/file.jsonl" in str(err)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "fine", "label": "a"}\n{"text": "also fine", "label": "b"}\n{"text": oops}\n'
    )
    err = _preflight_error(["model=tiny_bert", "data=jsonl", f"data.path={bad}"])
    assert err.key == "data.path" and f"{bad}:3" in str(err)


def test_record_missing_a_field_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "no label here"}\n')
    err = _preflight_error(["model=tiny_bert", "data=jsonl", f"data.path={bad}"])
    assert f"{bad}:2" in str(err) and "label" in str(err)


def test_label_outside_the_label_set_is_rejected(data_dir: Path) -> None:
    err = _preflight_error(
        tiny_overrides(data_dir, task="classification") + ["data.labels=[pos,neutral]"]
    )
    assert err.key == "data.labels" and "'neg'" in str(err)


def test_run_name_is_deterministic_and_tracks_training_settings() -> None:
    a, b = compose([]), compose([])
    assert run_name(a) == run_name(b)
    assert run_name(compose(["train.lr=5e-4"])) != run_name(a)
    assert run_name(compose(["cluster.num_cpus=2"])) == run_name(
        a
    )  # where it runs is not what it is
    assert run_name(compose(["run.name=mine"])) == "mine"


def test_a_key_added_to_the_schema_later_keeps_existing_run_names() -> None:
    """A rerun after an upgrade that added config keys (at their defaults) must find its
    run directory, and so its checkpoints, under the same name."""
    import dataclasses

    from conf.schema import DataConfig

    @dataclasses.dataclass
    class DataConfigNext(DataConfig):
        a_new_setting: int = 7

    a = compose(["data.max_length=64"])
    upgraded = dataclasses.replace(a, data=DataConfigNext(**dataclasses.asdict(a.data)))
    assert run_name(upgraded) == run_name(a)
    changed = dataclasses.replace(
        a, data=DataConfigNext(**dataclasses.asdict(a.data), a_new_setting=8)
    )
    assert run_name(changed) != run_name(a)
