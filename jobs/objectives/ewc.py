"""EWC: elastic weight consolidation (Kirkpatrick et al., 2017). A penalty that keeps
the weights that mattered for the task the model knew near their values:

    graft finetune model=hf model.path=runs/task-a/export \\
        'objectives=[{name: ewc, weight: 1.0, args: {source_path: task_a.jsonl}}]'

value = sum over trainable pretrained parameters of F * (w - w0)^2, with F the diagonal
(empirical) Fisher information of the source task at the starting weights w0: the mean
over source micro batches of the squared gradient of the task loss. The term's weight
is lambda.

args (checked before Ray starts, jobs/preflight.py):
- ``source_path``: the source task's data, in the run's data format (read like
  data.path; for a language model also a .txt of plain text). For classification the
  starting model must already predict the run's labels (a model fine-tuned on the
  source task, e.g. a graft run's export): the Fisher is the gradient of its own head's
  loss, which a new, random head would not give.
- ``batches``: how many source micro batches estimate F, over all workers (default 16).
- ``normalize``: ``mean`` (default: F divided by its mean over all entries, so lambda is
  on L2-SP's scale: lambda = 0.01 is L2-SP at 0.01 for a parameter of average
  importance) or ``none`` (raw F).

F is computed once, on the weights as built, before DeepSpeed starts (every worker its
share of the batches, then an all-reduce), and stored in the run directory
(``ewc_fisher.safetensors``): a resume, or a later phase of a progressive run, reads it
instead of recomputing. It covers every pretrained parameter outside the heads, trained
in this phase or not, so a block that unfreezes later is penalised from its first step.
The penalty is L2-SP's machinery with F as elementwise weights: the references and F
are frozen parameters partitioned with the model, each owner adds its share while its
weights are gathered, so ZeRO-3 gives the same value as ZeRO-0 (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from conf.schema import ConfigError, TermConfig
from jobs.objectives.args import check_keys, is_integer
from jobs.objectives.l2sp import L2SP, pretrained_name

ARGS = {"source_path", "batches", "normalize"}
NORMALIZE = ("mean", "none")
FISHER_FILE = "ewc_fisher.safetensors"


def check_args(index: int, args: dict[str, Any]) -> None:
    needed = (
        "ewc needs the source task's data to estimate the Fisher information: a file "
        "in the run's data format (a .txt of plain text for a language model)"
    )
    key = check_keys("ewc", index, args, ARGS, {"source_path": needed})
    batches = args.get("batches", 16)
    if not is_integer(batches) or batches < 1:
        raise ConfigError(f"{key}.batches", f"must be an integer >= 1, got {batches!r}")
    if args.get("normalize", "mean") not in NORMALIZE:
        raise ConfigError(
            f"{key}.normalize", f"{args.get('normalize')!r} is not one of {list(NORMALIZE)}"
        )


class EWC(L2SP):
    def __init__(self, cfg: TermConfig) -> None:
        self.name = cfg.name
        self.weight = cfg.weight
        args = dict(cfg.args)
        self.source_path = str(Path(str(args.get("source_path", ""))).expanduser())
        self.batches = int(args.get("batches", 16))
        self.normalize = str(args.get("normalize", "mean"))
        self._total: torch.Tensor | None = None
        self._counted: set[nn.Module] = set()
        self._handles: list[Any] = []

    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        return self.attach_scaled(model, context, self.fisher(model, context))

    def fisher(self, model: nn.Module, context: Any) -> dict[str, torch.Tensor]:
        """F by bare parameter name: read from the run directory, else estimated on
        ``model`` (its weights as built) and stored there."""
        from safetensors.torch import load_file, save_file

        store = Path(context.run_dir) / FISHER_FILE if context.run_dir is not None else None
        if store is not None and store.is_file():
            return load_file(store)
        if context.tokenizer is None:  # (jobs.memprobe: the same shapes, any values)
            initial = context.pretrained()
            return {k: torch.ones_like(v) for k, v in initial.items()}
        fisher = estimate_fisher(model, self._source_batches(context), context)
        if self.normalize == "mean":
            total = sum(f.sum() for f in fisher.values())
            count = sum(f.numel() for f in fisher.values())
            mean = float(total) / max(count, 1)
            fisher = {k: f / mean for k, f in fisher.items()} if mean > 0 else fisher
        if store is not None and _rank() == 0:
            tmp = store.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
            tmp.replace(store)
        return fisher

    def _source_batches(self, context: Any) -> list[dict[str, torch.Tensor]]:
        from jobs import data as data_lib
        from jobs import models

        records, data = data_lib.read_extra(
            self.source_path,
            context.data,
            context.task,
            key="objectives.ewc.args.source_path",
            labels=context.labels,
        )
        encoded = context.task.encode(records, context.tokenizer, data, context.labels)
        world, rank = _world(), _rank()
        batches = data_lib.eval_batches(
            encoded,
            rank=rank,
            world_size=world,
            micro_batch_size=context.micro_batch_size,
            pad_id=models.pad_id(context.tokenizer),
            collate_fn=context.task.collate,
        )
        per_rank = max(1, self.batches // world)
        return [b for b, counted in batches[:per_rank] if counted]


def estimate_fisher(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], context: Any
) -> dict[str, torch.Tensor]:
    """Mean over micro batches (and workers) of the squared task-loss gradient, for each
    pretrained parameter outside the heads; the model's flags and mode as they were."""
    initial = context.pretrained()
    targets: dict[str, nn.Parameter] = {}
    flags = {}
    for name, p in model.named_parameters():
        flags[name] = p.requires_grad
        bare = pretrained_name(name)
        wanted = bare in initial and context.layout.locate(name).kind != "head"
        p.requires_grad_(wanted)
        if wanted:
            targets[bare] = p
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in targets.items()}
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            context.task.loss(model(**batch), batch).backward()
            for k, p in targets.items():
                if p.grad is not None:
                    sums[k] += p.grad.detach().float().pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    count = torch.tensor([float(len(batches))])
    if torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"  # reduces GPU tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        flat = torch.cat([s.flatten() for s in sums.values()] + [count]).to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        count = flat[-1:]
        offset = 0
        for k, s in sums.items():
            sums[k] = flat[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
    return {k: s / count.clamp(min=1.0) for k, s in sums.items()}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
