"""Per-device memory: model states by ZeRO stage, precision and offload (DeepSpeed's
accounting), plus ZeRO's buffers."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.engine import bucket_sizes
from jobs.plan.trace import Counts
from jobs.plan.units import ADAM_BYTES, NF4_BYTES_PER_PARAM


# --------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Memory:
    """Bytes per device (GPU); ``host`` is what offload puts in CPU memory per rank."""

    params: int
    grads: int
    optimizer: int
    gathered: int  # ZeRO-3: one layer's parameters and gradients gathered whole
    buckets: int  # ZeRO-1/2/3: the gradient reduce bucket
    activations: int
    host: int = 0
    terms: int = 0  # the loss terms' frozen parameters (Counts.term_params)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer + self.terms

    @property
    def buffers(self) -> int:
        return self.gathered + self.buckets

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations


def model_states(
    counts: Counts,
    *,
    stage: int,
    world: int,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> Memory:
    """Per-rank parameters, gradients and optimizer states, plus ZeRO's buffers.

    P = all parameters, T = trainable, N = data-parallel ranks, L = the largest layer.
    Frozen parameters have no gradients or optimizer states; ZeRO-1/2 keep them whole on
    every rank, ZeRO-3 partitions them like the rest. Adam: two fp32 moments (8 bytes).
      bf16 (16-bit params, fp32 master weights):
        ZeRO-0    2P   + 2T        + 12T     DeepSpeed's bf16 wrapper (measured)
        ZeRO-1/2  2P   + 6T/N      + 12T/N   = DeepSpeed's estimate 2P + 18T/N for T = P
        ZeRO-3    2P/N + 4T/N      + 12T/N   = DeepSpeed's estimate 18P/N for T = P,
                  + 4L gathered (16-bit params and grads of one layer)
      fp32 (no master copy at ZeRO-0; ZeRO-1/2/3 keep an fp32 partition of their own):
        ZeRO-0    4P   + 4T        + 8T
        ZeRO-1/2  4P   + 4T/N      + 12T/N   (this DeepSpeed partitions ZeRO-1's grads too)
        ZeRO-3    4P/N + 4T/N      + 12T/N   + 8L gathered
    ZeRO-1/2/3 add one reduce bucket (``engine.bucket_sizes``) of gradients. The loss
    terms' frozen parameters (references, Fisher, a teacher) are stored like P.
    Optimizer offload moves gradients, master weights and moments to host memory (the
    device keeps 2P at ZeRO-2, 2P/N at ZeRO-3, as DeepSpeed estimates); parameter
    offload (ZeRO-3) moves the parameter partition too.
    """
    P, T, L, N = counts.total, counts.trainable, counts.largest_layer, world
    pbytes = 2 if bf16 else 4
    # QLoRA's quantized weights are stored at ~4.1 bits instead of 16.
    stored = P * pbytes - counts.quantized * (pbytes - NF4_BYTES_PER_PARAM)
    params = int(stored if stage < 3 else stored / N)
    if stage == 0:
        grads = pbytes * T
        optimizer = (ADAM_BYTES + (4 if bf16 else 0)) * T
    else:
        grads = ((6 if bf16 and stage < 3 else 4) * T) // N
        optimizer = (4 + ADAM_BYTES) * T // N
    buckets = bucket_sizes(counts.hidden)["reduce_bucket_size"] * pbytes if stage else 0
    gathered = 2 * pbytes * L if stage == 3 else 0
    host = 0
    if offload_optimizer and stage >= 1:
        host, grads, optimizer = grads + optimizer, 0, 0
    if offload_params and stage == 3:
        host, params = host + params, 0
    # The terms' frozen parameters: whole on every rank, partitioned under ZeRO-3.
    terms = counts.term_params * pbytes // (N if stage == 3 else 1)
    return Memory(params, grads, optimizer, gathered, buckets, 0, host, terms)
