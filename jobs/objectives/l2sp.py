"""L2-SP: a penalty on the distance to the pretrained weights (Li et al., 2018), the
simplest regulariser against forgetting what the backbone knew.

    graft finetune 'objectives=[{name: l2sp, weight: 0.01}]'

value = sum over trainable pretrained parameters of ||w - w0||^2 (the new head is left
out: it has no pretrained value). The reference w0 is read from the model's weights as
built (the pretrained checkpoint; for a scratch run, its seeded init) and kept as frozen
parameters in a module that DeepSpeed wraps with the model, so ZeRO-3 partitions it too.
Each owning module adds its share in a forward hook, while its weights are gathered
(under ZeRO-3 the reference is registered as the owner's external parameter, so it is
gathered beside them), so the same code is exact under ZeRO 0-3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conf.schema import ConfigError, TermConfig

# A scaled reference's weights sit beside it in the holder under this suffix.
SCALE = "__scale"
_PEFT_PARTS = ("base_model.model.", "base_layer.", "modules_to_save.default.", "original_module.")


def pretrained_name(name: str) -> str:
    """A parameter's name in the bare model (peft's wrappers removed)."""
    for part in _PEFT_PARTS:
        name = name.replace(part, "")
    return name


class L2SP:
    def __init__(self, cfg: TermConfig) -> None:
        self.name = cfg.name
        self.weight = cfg.weight
        unknown = sorted(set(cfg.args))
        if unknown:
            raise ConfigError(f"objectives.{cfg.name}.args", f"l2sp takes no args, got {unknown}")
        self._total: torch.Tensor | None = None
        self._counted: set[nn.Module] = set()  # owners summed since the last prepare
        self._handles: list[Any] = []

    def attach(self, model: nn.Module, context: Any) -> nn.Module:
        """Copies of the pretrained values of the trainable, pretrained parameters, in a
        module per owning module, and a forward hook on each owner."""
        return self.attach_scaled(model, context, None)

    def attach_scaled(
        self, model: nn.Module, context: Any, scales: dict[str, torch.Tensor] | None
    ) -> nn.Module:
        """As ``attach``; with ``scales`` (by bare name) each squared distance is
        weighted elementwise: sum of scale * (w - w0)^2 (EWC's Fisher)."""
        initial = context.pretrained()
        references = nn.ModuleDict()
        for owner_name, owner in model.named_modules():
            mine = {}
            for pname, param in owner.named_parameters(recurse=False):
                full = f"{owner_name}.{pname}" if owner_name else pname
                if not param.requires_grad or context.layout.locate(full).kind == "head":
                    continue
                key = pretrained_name(full)
                if key not in initial:
                    continue  # a new parameter (LoRA adapters): no pretrained value
                mine[pname] = nn.Parameter(initial[key].detach().clone(), requires_grad=False)
                if scales is not None:
                    mine[pname + SCALE] = nn.Parameter(
                        scales[key].detach().clone().to(param.dtype), requires_grad=False
                    )
            if not mine:
                continue
            holder = nn.Module()
            for pname, ref in mine.items():
                holder.register_parameter(pname, ref)
                if context.zero_stage == 3:
                    import deepspeed

                    # ZeRO-3 gathers the reference with the owner's own weights for its
                    # forward (and frees both after it, once this term's hook has run).
                    deepspeed.zero.register_external_parameter(owner, ref)
            references[owner_name.replace(".", "__") or "root"] = holder
            names = [n for n in mine if not n.endswith(SCALE)]
            self._handles.append(
                owner.register_forward_hook(self._hook(holder, names, scales is not None))
            )
        # Nothing pretrained trains in this phase (progressive's head-only start): the
        # term is 0. (A strategy that never trains any is refused by preflight.)
        self._active = bool(references)
        return references

    def _hook(self, holder: nn.Module, names: list[str], scaled: bool = False) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training or not torch.is_grad_enabled():
                return
            if holder in self._counted:  # a second forward in one step (DANN's target batch)
                return
            self._counted.add(holder)
            share = sum(
                (
                    (getattr(module, n) - getattr(holder, n).detach()).pow(2)
                    * (getattr(holder, n + SCALE).detach() if scaled else 1.0)
                ).sum()
                for n in names
            )
            assert isinstance(share, torch.Tensor)
            self._total = share if self._total is None else self._total + share

        return hook

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._total = None  # each forward sums afresh
        self._counted = set()
        return batch

    def value(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self._active:
            return torch.zeros(())
        if self._total is None:
            raise RuntimeError("l2sp: no owning module ran in this forward")
        value, self._total = self._total, None
        return value
