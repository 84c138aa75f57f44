"""Measure what a config really uses per rank: model-state bytes, saved activations, speed.

    python -m torch.distributed.run --nproc_per_node 2 -m jobs.memprobe OUT.json [overrides]
        [:: more overrides ...]     # several configs in one process group, in order

The same model, strategy, parameter groups and DeepSpeed config as `graft finetune`
(``jobs.finetune.start_engine``, the worker's own code, without Ray, data files or
checkpoints), on synthetic batches of
``train.micro_batch_size`` x ``data.max_length`` tokens. Per rank it measures:

- model states: the bytes of every distinct live tensor storage on the CPU
  (``jobs.memory.live_tensor_bytes``: parameters, gradients, optimizer states,
  DeepSpeed's flat buffers, partitions and buckets), taken on the last step inside
  backward (when the bottom block's gradient is due), after backward and after
  ``step``, the largest of the three; minus what was live before the model was built;
- activations: the bytes of distinct storages autograd saved during the last forward
  (parameters excluded), the same counter the planner runs on the meta device;
- tokens/s (all ranks) between the end of the first step and the end of the one
  before the last, and the process's peak RSS.

Used by the planner's tests (``tests/integration/test_plan.py``) and the memory
benchmarks. The JSON holds every rank's numbers per config. Peak RSS is the process's,
so it means something for the first config only; run ZeRO-3 configs last (DeepSpeed
leaves its ZeRO-3 linear in place of ``F.linear`` for the rest of the process).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import warnings

import torch
import torch.distributed as dist

from conf.schema import FinetuneConfig


def measure(cfg: FinetuneConfig, *, steps: int, rank: int, world: int) -> dict[str, float]:
    """One config's numbers on this rank."""
    from jobs import memory, plan, tasks
    from jobs.finetune import start_engine
    from jobs.models import Layout, build, hidden_size

    train = cfg.train
    baseline = memory.live_tensor_bytes()

    labels = plan.labels_for(cfg)
    model: torch.nn.Module
    model, tokenizer = build(cfg.model, labels=labels, seed=train.seed)
    width = hidden_size(model.config)
    layout = Layout.of(model.config)
    blocks = plan.block_modules(model, layout)
    engine = start_engine(model, cfg.strategy, cfg, layout, world=world, width=width).engine
    engine.train()
    generator = torch.Generator().manual_seed(rank)
    task = tasks.get(cfg.model)
    mb, seq = train.micro_batch_size, task.input_size(cfg.model, cfg.data)

    def batch() -> dict[str, torch.Tensor]:
        return task.example_batch(
            batch_size=mb,
            seq_len=seq,
            vocab=len(tokenizer) if hasattr(tokenizer, "__len__") else 0,
            num_labels=len(labels or []),
            generator=generator,
        )

    peak = [0]
    saved: memory.SavedActivations | None = None

    def census(*args: object) -> None:
        exclude = saved.alive() if saved is not None else set()
        peak[0] = max(peak[0], memory.live_tensor_bytes(exclude=exclude))

    activations, times = 0, []
    for step in range(steps):
        inputs = batch()
        last = step == steps - 1
        if last:
            # Inside backward, when the bottom block's gradient is due: buckets are full
            # and ZeRO-3 has that block's weights gathered.
            during = blocks[0].register_full_backward_pre_hook(census)
            with memory.SavedActivations(engine.module, blocks) as saved:  # noqa: F811
                loss = engine(**inputs).loss
            activations = saved.total
        else:
            loss = engine(**inputs).loss
        del inputs
        engine.backward(loss)
        del loss
        if last:
            during.remove()
            census()
        engine.step()
        if last:
            census()
        times.append(time.time())

    # Timed from the end of the first step to the end of the one before the last (the
    # last one pays for the census).
    timed = times[:-1]
    tokens_per_s = (len(timed) - 1) * mb * seq * world / (timed[-1] - timed[0])
    mine = {
        "rank": rank,
        "model_states": peak[0] - baseline,
        "activations": activations,
        "tokens_per_s": tokens_per_s,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    engine.destroy()
    return mine


def main() -> None:
    import deepspeed

    from jobs import engine as engine_lib
    from jobs import memory
    from jobs.config import compose

    warnings.filterwarnings("ignore")
    out_path, args = sys.argv[1], sys.argv[2:]
    # Several configs, separated by "::", run one after another in this process group.
    configs: list[list[str]] = [[]]
    for arg in args:
        if arg == "::":
            configs.append([])
        else:
            configs[-1].append(arg)
    steps = max(int(os.environ.get("GRAFT_PROBE_STEPS", "3")), 3)
    engine_lib.lean_deepspeed()
    memory.freeze_imports()  # (what the census counts is made after this)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = []
    for overrides in configs:
        mine = measure(compose(overrides), steps=steps, rank=rank, world=world)
        gathered: list[dict[str, float] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        runs.append({"overrides": overrides, "ranks": gathered})
        gc.collect()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world_size": world, "runs": runs}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
