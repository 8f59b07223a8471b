"""peft's LoRA linear whose plain single-adapter forward is `low_rank.low_rank_linear` (one addmm, or the
merged-weight product, instead of peft's full-width passes after B's product).

Used where peft's layers stay: DoRA and LoRA on convolutions (`-lora_conv`, whose linears are these); plain
LoRA and AdaLoRA on linears are the project's own (`lora_layer.py`). Everything else (state dict
keys, merging, DoRA, dropout, several adapters, rank allocation) stays peft's own: the cases not fused
take peft's forward unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from .low_rank import low_rank_linear


def fusable_adapter(layer: nn.Module, args: tuple, kwargs: dict) -> Optional[str]:
    """The layer's one active plain adapter (no variant, dropout or B bias), or None: peft's forward."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    plain = (adapter in layer.lora_A and adapter not in getattr(layer, "lora_variant", {})
             and not getattr(layer, "lora_bias", {}).get(adapter) and isinstance(layer.lora_dropout[adapter], nn.Identity))
    return adapter if plain else None


class FusedLoraLinear(LoraLinear):
    """A peft LoRA `Linear` whose plain single-adapter forward is `low_rank_linear`."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = fusable_adapter(self, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        return low_rank_linear(self.base_layer, x, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                               self.scaling[adapter])


def fused_lora_config(**options: Any) -> LoraConfig:
    """A `LoraConfig(**options)` whose adapted `nn.Linear`s become `FusedLoraLinear`."""
    config = LoraConfig(**options)
    config._register_custom_module({nn.Linear: FusedLoraLinear})
    return config
