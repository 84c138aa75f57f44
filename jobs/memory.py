"""Counting memory: tensors autograd saves for backward, and live tensor storage.

    python -c "from jobs.memory import live_tensor_bytes; print(live_tensor_bytes())"

Both the planner (``jobs.plan``, on the meta device) and the measurement probe
(``jobs.memprobe``, on real tensors) use ``SavedActivations``, so an estimate and a
measurement count the same thing: the bytes of distinct storages autograd keeps between
forward and backward, parameters excluded. Views of one storage count once.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identifies a tensor's storage: its address, or on the meta device (no addresses)
    the storage object itself."""
    storage = t.untyped_storage()
    if t.device.type == "meta":
        return ("meta", storage._cdata)
    return (t.device.type, storage.data_ptr())


class SavedActivations:
    """Sums the storages autograd saves during a forward pass, by block.

    ``with SavedActivations(model, blocks) as saved: loss = model(**batch).loss``;
    ``saved.total`` is every saved byte, ``saved.per_block`` the bytes saved while each
    block's forward ran (index = position in ``blocks``), ``saved.outside`` the rest
    (embeddings, head, loss). Parameters, and tensors sharing their storage, are not counted.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module] = ()) -> None:
        self._params = {storage_key(p) for p in model.parameters() if p.numel()}
        self._blocks = list(blocks)
        self._seen: dict[tuple[str, int], int] = {}
        self._owner: dict[tuple[str, int], int] = {}
        self._refs: dict[tuple[str, int], weakref.ref[torch.Tensor]] = {}
        self._current: int = -1
        # Each block's input (its first tensor argument) in bytes: what checkpointing keeps.
        self.boundaries: list[int] = []
        self._handles: list[Any] = []
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A saved Parameter is kept by reference, not by its storage: ZeRO-3 frees the
        # gathered weights after each module and gathers them again for backward.
        if t.numel() and not isinstance(t, nn.Parameter):
            key = storage_key(t)
            if key not in self._params and key not in self._seen:
                self._seen[key] = t.untyped_storage().nbytes()
                self._owner[key] = self._current
                if t.device.type != "meta":
                    self._refs[key] = weakref.ref(t)
        return t

    def __enter__(self) -> SavedActivations:
        for i, block in enumerate(self._blocks):
            self._handles.append(block.register_forward_pre_hook(self._enter_block(i)))
            self._handles.append(block.register_forward_hook(self._leave_block))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def _enter_block(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._current = i
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                self.boundaries.append(first.numel() * first.element_size())

        return hook

    def _leave_block(self, module: nn.Module, args: Any, output: Any) -> None:
        self._current = -1

    def alive(self) -> set[tuple[str, int]]:
        """Storage keys of the saved tensors autograd still holds (backward frees each
        after use, and the allocator may hand its address to a gradient)."""
        keys = set()
        for key, ref in self._refs.items():
            t = ref()
            if t is not None and storage_key(t) == key:
                keys.add(key)
        return keys

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    @property
    def per_block(self) -> list[int]:
        sums = [0] * len(self._blocks)
        for key, nbytes in self._seen.items():
            if self._owner[key] >= 0:
                sums[self._owner[key]] += nbytes
        return sums

    @property
    def outside(self) -> int:
        return sum(n for k, n in self._seen.items() if self._owner[k] < 0)


def freeze_imports() -> None:
    """Move everything alive now (the imported libraries: ~0.5M objects in a worker)
    out of the garbage collector's reach, once, before any model is built: each full
    collection then costs microseconds instead of ~0.3-1 s. DeepSpeed collects on every
    ZeRO-3 engine build (its defragment), graft on every phase change and after every
    run of a gang. Tensors made from here on stay visible to ``live_tensor_bytes``
    (frozen objects are not in ``gc.get_objects()``; none of them is a model's)."""
    from jobs.engine import import_deepspeed

    import_deepspeed()  # (every run builds an engine: frozen with the rest)

    gc.collect()
    gc.freeze()


def _live_tensors() -> Iterator[torch.Tensor]:
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                yield obj
                if obj.grad is not None:
                    yield obj.grad
        except ReferenceError:  # a weakref proxy whose target is gone
            continue


def live_tensor_bytes(
    device: str = "cpu", exclude: Iterable[tuple[str, int]] = (), *, collect: bool = True
) -> int:
    """Bytes of every distinct tensor storage reachable from Python on ``device``
    (parameters, their ``.grad``, optimizer states, DeepSpeed's flat buffers and
    partitions, ...). Each storage counts once, whatever views point into it.
    ``exclude``: storage keys not to count (activations saved for backward, which keep
    their Python objects while autograd holds them). ``collect=False``: the caller has
    just run the garbage collector (a full collection costs ~0.5 s in a worker)."""
    if collect:
        gc.collect()
    skip = set(exclude)
    seen: dict[tuple[str, int], int] = {}
    for t in _live_tensors():
        if t.device.type != device or t.is_sparse:
            continue
        storage = t.untyped_storage()
        key = storage_key(t)
        if storage.nbytes() and key not in skip:
            seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())
