"""Plain LoRA on linears without peft: the layer, its injection, merging and peft's file format.

`-mod sam_lora` (and every `-decoder lora`) adapts linears with `LoraLinear`, which has peft's layout
(`base_layer`, `lora_A.default`, `lora_B.default`, the adapter name "default"), peft's initialisation drawn
in peft's order, and so its state-dict keys and, for one seed, its starting values. A training process
then never imports peft, which imports transformers' model classes: about 100 MB of resident memory and
3 s of start-up on a 2-core CPU. DoRA, LoRA on convolutions and AdaLoRA stay peft's (lora.py, adalora.py).
Tests compare outputs, gradients, merging and the written peft folder with peft's own LoRA.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from .low_rank import add_low_rank, low_rank_linear

ADAPTER = "default"  # peft's adapter name, part of every state-dict key


class LoraLinear(nn.Module):
    """`base(x) + scaling * B A dropout(x)` around a linear `base_layer`; A is r x in, B is out x r (zero)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(base_layer.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, base_layer.out_features, bias=False)})
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))  # peft's default, drawn after
        nn.init.zeros_(self.lora_B[ADAPTER].weight)                           # both layers' own init
        self.lora_A.to(base_layer.weight.device)
        self.lora_B.to(base_layer.weight.device)

    @property
    def down(self) -> Tensor:
        return self.lora_A[ADAPTER].weight

    @property
    def up(self) -> Tensor:
        return self.lora_B[ADAPTER].weight

    def forward(self, x: Tensor) -> Tensor:
        dropout = self.lora_dropout[ADAPTER]
        if isinstance(dropout, nn.Identity):
            return low_rank_linear(self.base_layer, x, self.down, self.up, self.scaling)
        return add_low_rank(self.base_layer(x), nn.functional.linear(dropout(x), self.down), self.up, self.scaling)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with `scaling * B A` added to its weight (in place)."""
        delta = (self.up.float() @ self.down.float()) * self.scaling
        self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        return self.base_layer


class LoraTuner:
    """LoRA layers injected into `model`, whose other parameters are frozen (as peft does); merging the layers
    away, and their tensors and config in peft's format."""

    def __init__(self, model: nn.Module, target_modules: str, rank: int, alpha: float, dropout: float):
        self.model = model.requires_grad_(False)
        self.config = dict(target_modules=target_modules, r=rank, lora_alpha=alpha, lora_dropout=dropout)
        self.names = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
        for name in self.names:
            parent, _, child = name.rpartition(".")
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA target {name} is a {type(base).__name__}, not a linear")
            setattr(model.get_submodule(parent), child, LoraLinear(base, rank, alpha, dropout))
        if not self.names:
            raise ValueError(f"no module matches the LoRA targets {target_modules}")

    def merge_and_unload(self) -> nn.Module:
        """Fold every layer into its base linear and put the base linear back in its place."""
        for name in self.names:
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, self.model.get_submodule(name).merged())
        self.names = []
        return self.model

    def peft_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The adapter tensors under the keys peft's PeftModel reads (`base_model.model.<module>.lora_A.weight`)
        and the fields of peft's `adapter_config.json` (peft fills in the defaults of the rest)."""
        tensors = {f"base_model.model.{key.replace(f'.{ADAPTER}.', '.')}": value.detach().cpu().contiguous()
                   for key, value in self.model.state_dict().items() if ".lora_A." in key or ".lora_B." in key}
        config = dict(peft_type="LORA", task_type=None, base_model_name_or_path=None, revision=None,
                      inference_mode=True, bias="none", fan_in_fan_out=False, init_lora_weights=True,
                      use_rslora=False, use_dora=False, lora_bias=False, modules_to_save=None, **self.config)
        return tensors, config
