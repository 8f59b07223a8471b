"""sam_adpt: bottleneck Adapters after every encoder block's attention and beside its MLP.

Adapters hang on the existing attention/MLP modules as a child `adapter` plus a forward hook, so
the base weights keep their official key names and the adapter keys are simply added.
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from .adaptation import Adaptation, freeze_all_but_decoder


class Adapter(nn.Module):
    """down-project, GELU, up-project; the up-projection starts at zero so the block is unchanged."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


def _after_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output + module.adapter(output)


def _beside_module(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output + module.adapter(inputs[0])


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def attach_adapters(encoder: nn.Module, attention: str, mlp: str, bottleneck: int | None) -> int:
    """Attach Adapters to every module matching `attention` (serial) or `mlp` (parallel); returns the count."""
    count = 0
    for name, module in list(encoder.named_modules()):
        if re.fullmatch(attention, name):
            dim, hook = _linears(module)[-1].out_features, _after_output
        elif re.fullmatch(mlp, name):
            dim, hook = _linears(module)[0].in_features, _beside_module
        else:
            continue
        module.adapter = Adapter(dim, bottleneck or max(1, dim // 4))
        module.register_forward_hook(hook)
        count += 1
    if count == 0:
        raise ValueError("no attention or MLP module matched the encoder's adapt targets")
    return count


def apply_adapter(segmenter: nn.Module, total_steps: int, *, mid_dim: int | None, decoder: str) -> Adaptation:
    """`mid_dim`: the bottleneck width (None: a quarter of each adapted module's width); `decoder`:
    full | lora | frozen (decoder LoRA of the default rank)."""
    decoder_tuner = freeze_all_but_decoder(segmenter, decoder)
    targets = segmenter.adapt_targets
    attach_adapters(segmenter.image_encoder, targets.attention, targets.mlp, mid_dim)
    return Adaptation("sam_adpt", decoder_tuner=decoder_tuner)
