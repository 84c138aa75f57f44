"""A hand-written minimal DeepSpeed loop: the baseline `graft finetune` is measured against.

    python -m torch.distributed.run --nproc_per_node 2 tests/benchmarks/minimal_ds_loop.py OUT.json CONFIG.json

Same model, same batches, same DeepSpeed config as the graft run it is compared with;
nothing else: no Ray, no evaluation, no checkpoints, no logging beyond timestamps.
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTED = time.time()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conf.schema import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from jobs import data as data_lib  # noqa: E402
from jobs.models import build  # noqa: E402


def main() -> None:
    out_path, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path).read())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model_cfg, data_cfg, train = (
        ModelConfig(**spec["model"]),
        DataConfig(**spec["data"]),
        TrainConfig(**spec["train"]),
    )
    ds = data_lib.load(data_cfg)
    model, tok = build(model_cfg, labels=ds.labels)  # (labels: None unless classification)
    encoded = data_lib.encode(ds.train, tok, data_cfg, ds.labels)
    batches = data_lib.train_batches(
        encoded,
        rank=rank,
        world_size=world,
        seed=0,
        micro_batch_size=train.micro_batch_size,
        pad_id=tok.pad_token_id,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=spec["deepspeed"])
    times = []
    for _ in range(train.max_steps):
        loss = engine(**next(batches)).loss
        engine.backward(loss)
        engine.step()
        times.append(time.time())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {"started": float(os.environ.get("BENCH_T0", STARTED)), "step_times": times}, f
            )
    # After the timed loop: a rank that exits with gloo's threads still up can abort
    # in its teardown ("terminate called without an active exception"); so can one that
    # tears its group down while the other still writes the times (seen once in a
    # bench-overhead run): both reach the teardown together.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
