"""peft's LoRA and AdaLoRA linears with the branch added inside a matmul.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` (AdaLoRA also divides by the rank): after B's
product, more passes over the full-width output (the scaling, the sum) and more in backward. Here the
scaling goes onto the rank-wide product or into `addmm`'s alpha, and B's product accumulates into the base
output as one `addmm`. Everything else (state dict keys, merging, DoRA, dropout, several adapters, rank
allocation) stays peft's own: the cases not fused take peft's forward unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.adalora.layer import SVDLinear
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn


def fusable_adapter(layer: nn.Module, args: tuple, kwargs: dict) -> Optional[str]:
    """The layer's one active plain adapter (no variant, dropout or B bias), or None: peft's forward."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    plain = (adapter in layer.lora_A and adapter not in getattr(layer, "lora_variant", {})
             and not getattr(layer, "lora_bias", {}).get(adapter) and isinstance(layer.lora_dropout[adapter], nn.Identity))
    return adapter if plain else None


def add_low_rank(out: Tensor, low_rank: Tensor, up: Tensor, alpha: float = 1.0) -> Tensor:
    """`out + alpha * low_rank @ up^T` as one addmm over the flattened tokens."""
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), up.t(), alpha=alpha)
    return fused.view(out.shape)


class FusedLoraLinear(LoraLinear):
    """A peft LoRA `Linear` whose plain single-adapter forward is `addmm(base(x), x A^T, B^T, alpha=s)`."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = fusable_adapter(self, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        low_rank = self.lora_A[adapter](x)
        return add_low_rank(self.base_layer(x), low_rank, self.lora_B[adapter].weight, self.scaling[adapter])


class FusedSVDLinear(SVDLinear):
    """A peft AdaLoRA `SVDLinear` whose plain single-adapter forward scales the rank-wide product
    `x (A*E)^T` by scaling / rank and adds its product with B to the base output in one addmm."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = fusable_adapter(self, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        singular = self.lora_A[adapter] * self.lora_E[adapter]
        low_rank = F.linear(x, singular) * (self.scaling[adapter] / (self.ranknum[adapter] + 1e-5))
        return add_low_rank(self.base_layer(x), low_rank, self.lora_B[adapter])


def fuse_svd_linears(tuner: AdaLoraModel) -> AdaLoraModel:
    """Make the tuner's AdaLoRA `SVDLinear`s `FusedSVDLinear`s (peft has no custom-layer hook for AdaLoRA;
    the subclass adds no state, so only the class changes)."""
    for module in tuner.modules():
        if type(module) is SVDLinear:
            module.__class__ = FusedSVDLinear
    return tuner


def fused_lora_config(**options: Any) -> LoraConfig:
    """A `LoraConfig(**options)` whose adapted `nn.Linear`s become `FusedLoraLinear`."""
    config = LoraConfig(**options)
    config._register_custom_module({nn.Linear: FusedLoraLinear})
    return config
