"""`graft plan`: will this config fit, and how, before any GPU is taken.

    graft plan model=llama3_8b data=jsonl data.task=instruction data.path=x.jsonl \
        data.max_length=2048 strategy=lora deepspeed=zero3 --num-gpus 8 --gpu-memory 80GiB
    graft plan [overrides] --recommend      # the cheapest overrides that fit

The model is built on the meta device from its config (no weights are read, so a 70B
config plans in seconds), the strategy is applied to it (frozen layers, LoRA adapters),
and one forward pass runs on meta tensors while ``jobs.memory.SavedActivations`` adds up
what autograd keeps for backward. Per device it reports:

  parameters, gradients, optimizer states   by ZeRO stage, offload, precision, and the
                                            trainable/frozen split (``model_states``)
  buffers                                   ZeRO's communication buckets, ZeRO-3's
                                            gathered layer
  activations                               at the micro batch and sequence length,
                                            without and with activation checkpointing

The model-state accounting is DeepSpeed's: with bf16 the ZeRO-2 and ZeRO-3 figures are
those of DeepSpeed's estimators (ZeRO-3 adds the 16-bit parameter partition they leave
out); the fp32 accounting follows what DeepSpeed allocates on the CPU, checked against
measured runs (``jobs.memprobe``). Compatibility checks give a verdict and a reason.

Split by concern: ``trace`` (meta-device model, counts, saved activations), ``memory``
(model states), ``checks`` (one small function per compatibility check), ``estimate``,
``recommend`` and ``render``; ``units`` parses and prints sizes.
"""

from __future__ import annotations

from jobs.plan.checks import CHECKS, Check, Plan, compatibility
from jobs.plan.estimate import estimate
from jobs.plan.memory import Memory, model_states
from jobs.plan.recommend import Option, recommend
from jobs.plan.render import merge, render, to_dict
from jobs.plan.trace import Activations, Counts, block_modules, labels_for, trace
from jobs.plan.units import ADAM_BYTES, NF4_BYTES_PER_PARAM, GiB, fmt, parse_size

__all__ = [
    "ADAM_BYTES",
    "CHECKS",
    "NF4_BYTES_PER_PARAM",
    "Activations",
    "Check",
    "Counts",
    "GiB",
    "Memory",
    "Option",
    "Plan",
    "block_modules",
    "compatibility",
    "estimate",
    "fmt",
    "labels_for",
    "merge",
    "model_states",
    "parse_size",
    "recommend",
    "render",
    "to_dict",
    "trace",
]
