"""peft's LoRA linear with the branch added inside a matmul.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: after B's product, two more passes over the output
(the scaling, the sum) and one more in backward (the scaling of the gradient). Here B's product accumulates
into the base output as one `addmm` with `alpha=scaling`. Everything else (state dict keys, merging, DoRA,
dropout, several adapters) stays peft's own: those cases take peft's forward unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn


class FusedLoraLinear(LoraLinear):
    """A peft LoRA `Linear` whose plain single-adapter forward is `addmm(base(x), x A^T, B^T, alpha=s)`."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = self._fusable_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        out = self.base_layer(x)
        low_rank = self.lora_A[adapter](x)
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                            self.lora_B[adapter].weight.t(), alpha=self.scaling[adapter])
        return fused.view(out.shape)

    def _fusable_adapter(self, args: tuple, kwargs: dict) -> Optional[str]:
        """The one active plain-LoRA adapter (no variant, dropout or B bias), or None: peft's forward."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        plain = (adapter in self.lora_A and adapter not in self.lora_variant and not self.lora_bias[adapter]
                 and isinstance(self.lora_dropout[adapter], nn.Identity))
        return adapter if plain else None


def fused_lora_config(**options: Any) -> LoraConfig:
    """A `LoraConfig(**options)` whose adapted `nn.Linear`s become `FusedLoraLinear`."""
    config = LoraConfig(**options)
    config._register_custom_module({nn.Linear: FusedLoraLinear})
    return config
