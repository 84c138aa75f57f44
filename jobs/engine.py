"""DeepSpeed settings, derived in one place from the deepspeed/ and train groups.

    python -c "from jobs.engine import deepspeed_config; from conf.schema import *; \
        print(deepspeed_config(DeepSpeedConfig(stage=3), TrainConfig(), world_size=2, hidden_size=64))"
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
from functools import partial
from typing import Any

import torch

from conf.schema import DeepSpeedConfig, TrainConfig

# DeepSpeed's JIT-built shared-memory all-reduce (CPU accelerator) serves only its
# tensor-parallel inference path; building it costs a C++ compile (60-70 s on 2 cores)
# in every fresh TORCH_EXTENSIONS_DIR, and a training run never calls it.
UNUSED_OPS = ("deepspeed_shm_comm",)


class _NotImported(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` (and its submodules) fail while it is on sys.meta_path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} is left out while deepspeed imports")
        return None


def import_deepspeed() -> Any:
    """``deepspeed``, imported without its autotuner's optional ``import mlflow`` (which
    pulls pandas and mlflow's whole client in: ~0.9 s of the ~1.1 s DeepSpeed costs a
    worker at start when mlflow is installed). graft never autotunes; mlflow itself
    still imports afterwards (run.loggers=[mlflow])."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    blocker = _NotImported("mlflow")
    sys.meta_path.insert(0, blocker)
    try:
        import deepspeed
    finally:
        sys.meta_path.remove(blocker)
    return deepspeed


def _muon_uncompiled() -> None:
    """ZeRO-1/2's gradient reduction imports DeepSpeed's Muon optimizer at the first
    backward (only to test ``isinstance(optimizer, MuonWithAuxAdam)``), and that import
    wraps Muon's kernels in ``torch.compile``, which loads TorchInductor: ~0.9 s of CPU
    per worker before its first step. graft's optimizer is AdamW, so Muon's kernels are
    never called: imported here with ``torch.compile`` as the identity, they stay eager."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    compile_ = torch.compile

    def eager(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    torch.compile = eager  # type: ignore[assignment]
    try:
        importlib.import_module(name)
    finally:
        torch.compile = compile_


def lean_deepspeed() -> None:
    """Before DeepSpeed's communication backend starts in this process: skip building
    what a graft training run never uses (UNUSED_OPS), and import its Muon optimizer
    without compiling it. Idempotent; the run trains exactly as before."""
    deepspeed = import_deepspeed()
    _muon_uncompiled()

    compatible = deepspeed.ops.__compatible_ops__  # one dict, kept by the module
    for name in UNUSED_OPS:
        compatible[name] = False


def global_batch_size(train: TrainConfig, world_size: int) -> int:
    return train.micro_batch_size * train.grad_accum_steps * world_size


def describe_batch(train: TrainConfig, world_size: int) -> str:
    return (
        f"global batch {global_batch_size(train, world_size)} = micro batch {train.micro_batch_size}"
        f" x accumulation {train.grad_accum_steps} x {world_size} workers"
    )


def bucket_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO's communication buckets (in elements), sized from the model's hidden size as
    the Hugging Face integration does; DeepSpeed's defaults (5e8 elements, 2 GB at fp32)
    would dwarf a small model. The floor keeps tiny models to one bucket."""
    square = max(hidden_size * hidden_size, 2**20)
    return {
        "reduce_bucket_size": square,
        "allgather_bucket_size": square,
        "stage3_prefetch_bucket_size": int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def deepspeed_config(
    ds: DeepSpeedConfig, train: TrainConfig, *, world_size: int, hidden_size: int
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.stage, **bucket_sizes(hidden_size)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_batch_size": global_batch_size(train, world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        # graft hands DeepSpeed a plain torch AdamW with named parameter groups
        # (discriminative learning rates); no JIT-compiled optimizer is needed.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.config is not None:  # the user's JSON over graft's (checked: no batch keys)
        from conf.schema import user_deepspeed_config

        config = merged(config, user_deepspeed_config(ds.config))
    return config


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` recursively (``over`` wins on leaves)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


# train.schedule -> transformers' name for it.
_HF_SCHEDULES = {"constant": "constant_with_warmup"}


@functools.lru_cache(maxsize=64)
def _schedule_lambda(name: str, warmup_steps: int, max_steps: int) -> Any:
    """transformers.get_scheduler's own lr multiplier for the schedule (warmup from 0,
    then the decay over ``max_steps``), taken off a scheduler built on a throwaway
    optimizer: graft composes it with phases and re-warmups (``_phase_factor``)."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    built = get_scheduler(
        _HF_SCHEDULES.get(name, name),
        probe,
        num_warmup_steps=warmup_steps,
        num_training_steps=max_steps,
    )
    return built.lr_lambdas[0]


def _lr_factor(step: int, *, train: TrainConfig) -> float:
    return float(_schedule_lambda(train.schedule, train.warmup_steps, train.max_steps)(step))


def optimizer(groups: list[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    # Extra keys ("name", "depth") stay in each group: logs and checkpoints carry them.
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)


def _phase_factor(step: int, *, train: TrainConfig, start_step: int, rewarmup_steps: int) -> float:
    factor = _lr_factor(start_step + step, train=train)
    if rewarmup_steps and step < rewarmup_steps:
        factor *= (step + 1) / (rewarmup_steps + 1)
    return factor


def scheduler(
    opt: torch.optim.Optimizer,
    train: TrainConfig,
    *,
    start_step: int = 0,
    rewarmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then the schedule, scaling every group's own lr (ratios are kept). A phase
    that starts at ``start_step`` continues the run's schedule from there, optionally
    warming up again over ``rewarmup_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        partial(_phase_factor, train=train, start_step=start_step, rewarmup_steps=rewarmup_steps),
    )
