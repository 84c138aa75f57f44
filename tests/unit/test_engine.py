"""DeepSpeed settings derived in one place; the lr schedule keeps per-group ratios."""

from __future__ import annotations

import pytest
import torch

from conf.schema import SCHEDULES, DeepSpeedConfig, TrainConfig
from jobs import engine
from tests.conftest import fresh_python


@pytest.mark.parametrize(("micro", "accum", "world"), [(8, 1, 1), (4, 4, 2), (2, 3, 8)])
def test_global_batch_is_micro_times_accumulation_times_world(
    micro: int, accum: int, world: int
) -> None:
    train = TrainConfig(micro_batch_size=micro, grad_accum_steps=accum)
    ds = engine.deepspeed_config(DeepSpeedConfig(stage=2), train, world_size=world, hidden_size=64)
    assert ds["train_batch_size"] == micro * accum * world
    assert (
        ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum
    )
    assert f"global batch {micro * accum * world}" in engine.describe_batch(train, world)


def test_offload_and_stage3_settings() -> None:
    ds = engine.deepspeed_config(
        DeepSpeedConfig(stage=3, offload_optimizer=True, offload_params=True, bf16=True),
        TrainConfig(),
        world_size=2,
        hidden_size=4096,
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu" and ds["bf16"]["enabled"] is True
    # Buckets follow the model's width (DeepSpeed's 5e8-element defaults would not).
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_param_persistence_threshold"] == 40960


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_warms_up_then_decays_keeping_group_ratios(schedule: str) -> None:
    train = TrainConfig(max_steps=20, warmup_steps=4, schedule=schedule, lr=1.0)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = engine.optimizer(
        [
            {"params": [w], "lr": 1.0, "name": "top"},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.25, "name": "low"},
        ],
        train,
    )
    sched = engine.scheduler(opt, train)
    seen = []
    for _ in range(20):
        top, low = sched.get_last_lr()
        assert low == pytest.approx(0.25 * top)
        seen.append(top)
        opt.step()
        sched.step()
    assert seen[0] < seen[3] < seen[4] + 1e-9  # warmup rises
    if schedule not in ("constant", "inverse_sqrt", "cosine_with_restarts"):
        assert seen[-1] < 0.15 * seen[4]
    # step for step what transformers.get_scheduler gives a plain optimizer
    from transformers import get_scheduler

    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(
        "constant_with_warmup" if schedule == "constant" else schedule,
        plain,
        num_warmup_steps=4,
        num_training_steps=20,
    )
    expected = []
    for _ in range(20):
        expected.append(hf.get_last_lr()[0])
        plain.step()
        hf.step()
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lean_deepspeed_skips_the_shared_memory_op_training_never_calls() -> None:
    """Its C++ build took 60-70 s in every fresh TORCH_EXTENSIONS_DIR (twice per suite)."""
    import importlib

    import deepspeed

    from jobs.engine import lean_deepspeed

    backend = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch is torch)

    lean_deepspeed()
    lean_deepspeed()  # idempotent
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert backend.build_shm_op() is None  # nothing built, nothing loaded


def test_a_users_deepspeed_json_is_merged_over_grafts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123},
             "activation_checkpointing": {"partition_activations": True}}
        )
    )  # fmt: skip
    ds = engine.deepspeed_config(
        DeepSpeedConfig(stage=2, config=str(user)), TrainConfig(), world_size=2, hidden_size=64
    )
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 123  # the user's
    assert zero["stage"] == 2 and zero["allgather_bucket_size"] == 2**20  # graft's kept
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["train_batch_size"] == TrainConfig().micro_batch_size * 2


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"train_batch_size": 64}', "train_batch_size, which graft sets from train.micro_batch_size"),
        ('{"zero_optimization": {"stage": 3}}', "zero_optimization.stage, which graft sets from deepspeed.stage"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)  # fmt: skip
def test_a_users_deepspeed_json_may_not_take_grafts_keys(tmp_path, content: str, says: str) -> None:  # type: ignore[no-untyped-def]
    from conf.schema import ConfigError

    user = tmp_path / "ds.json"
    user.write_text(content)
    with pytest.raises(ConfigError, match="deepspeed.config") as raised:
        DeepSpeedConfig(stage=2, config=str(user)).check()
    assert says in str(raised.value)
    with pytest.raises(ConfigError, match="does not exist"):
        DeepSpeedConfig(config=str(tmp_path / "missing.json")).check()


def test_deepspeed_imports_without_mlflow_and_mlflow_still_imports_after() -> None:
    """In a fresh interpreter (a worker): DeepSpeed's autotuner would import mlflow (and
    pandas) at start; graft's import leaves it out, and run.loggers=[mlflow] still
    imports it afterwards."""
    code = (
        "import sys; from jobs.engine import import_deepspeed; ds = import_deepspeed(); "
        "print('deepspeed' in sys.modules, 'mlflow' in sys.modules, 'pandas' in sys.modules); "
        "import mlflow; print(bool(mlflow.__version__))"
    )
    out = fresh_python(code).splitlines()  # (after DeepSpeed's own accelerator warning)
    assert out[-2:] == ["True False False", "True"]


def test_lean_deepspeed_imports_muon_without_torch_compile_and_restores_it() -> None:
    code = (
        "import sys, torch; before = torch.compile; from jobs.engine import lean_deepspeed; "
        "lean_deepspeed(); from deepspeed.runtime.zero.muon import original_muon as m; "
        "print(torch.compile is before, 'torch._inductor.compile_fx' in sys.modules, "
        "type(m.muon_update).__name__)"
    )
    out = fresh_python(code).splitlines()
    assert out[-1] == "True False function"  # eager Muon, no TorchInductor loaded
