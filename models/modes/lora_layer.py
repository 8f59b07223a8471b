"""LoRA and AdaLoRA on linears without peft: the layers, their injection, merging and peft's file format.

`-mod sam_lora` (and every `-decoder lora`) adapts linears with `LoraLinear`, which has peft's layout
(`base_layer`, `lora_A.default`, `lora_B.default`, the adapter name "default"), peft's initialisation drawn
in peft's order, and so its state-dict keys and, for one seed, its starting values. A training process
then never imports peft, which imports transformers' model classes: about 100 MB of resident memory and
3 s of start-up on a 2-core CPU. AdaLoRA's `AdaLoraLinear` is peft's `SVDLinear` likewise. DoRA and LoRA on
convolutions stay peft's (lora.py). Tests compare keys, starting values, outputs, gradients, merging and the
written peft folder with peft's own layers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .low_rank import add_low_rank, low_rank_linear

ADAPTER = "default"  # peft's adapter name, part of every state-dict key


class AdaptedLinear(nn.Module):
    """A linear `base_layer` with a low-rank branch behind dropout, under peft's attribute names."""

    def __init__(self, base_layer: nn.Linear, rank: int, dropout: float, method: str):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"{method} rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})


class LoraLinear(AdaptedLinear):
    """`base(x) + scaling * B A dropout(x)` around a linear `base_layer`; A is r x in, B is out x r (zero)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base_layer, rank, dropout, "LoRA")
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(base_layer.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, base_layer.out_features, bias=False)})
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))  # peft's default, drawn after
        nn.init.zeros_(self.lora_B[ADAPTER].weight)                           # both layers' own init
        self.to(base_layer.weight.device)

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


class AdaLoraLinear(AdaptedLinear):
    """peft's AdaLoRA `SVDLinear`: `base(x) + scaling / (ranknum + 1e-5) * x (A * E)^T B^T` with P = A (r x in),
    the singular values E (r x 1, zero at the start) and Q = B (out x r) as `ParameterDict`s keyed "default",
    and the frozen rank `ranknum`. Rank allocation (rank_budget.py) zeroes entries of E."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base_layer, rank, dropout, "AdaLoRA's initial")
        down = nn.Parameter(torch.randn(rank, base_layer.in_features))  # drawn in peft's order: A, E, B, ranknum
        singular = nn.Parameter(torch.randn(rank, 1))
        self.lora_A = nn.ParameterDict({ADAPTER: down})
        self.lora_B = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(base_layer.out_features, rank))})
        self.lora_E = nn.ParameterDict({ADAPTER: singular})
        self.ranknum = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(1).fill_(rank), requires_grad=False)})
        self.scaling = alpha if alpha > 0 else float(rank)
        nn.init.zeros_(self.lora_E[ADAPTER])
        nn.init.normal_(self.lora_A[ADAPTER], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[ADAPTER], mean=0.0, std=0.02)
        self.to(base_layer.weight.device)

    def scale(self) -> Tensor:
        return self.scaling / (self.ranknum[ADAPTER] + 1e-5)

    def forward(self, x: Tensor) -> Tensor:
        dropout, singular = self.lora_dropout[ADAPTER], self.lora_A[ADAPTER] * self.lora_E[ADAPTER]
        if isinstance(dropout, nn.Identity):
            return low_rank_linear(self.base_layer, x, singular, self.lora_B[ADAPTER], self.scale())
        low_rank = nn.functional.linear(dropout(x), singular) * self.scale()
        return add_low_rank(self.base_layer(x), low_rank, self.lora_B[ADAPTER])

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the update added to its weight (in place)."""
        delta = (self.lora_B[ADAPTER] @ (self.lora_A[ADAPTER] * self.lora_E[ADAPTER])) * self.scale()
        self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        return self.base_layer


class LowRankTuner:
    """Low-rank layers (`layer(base, rank, alpha, dropout)`) injected in place of the linears of `model` whose
    names match `target_modules`; the model's other parameters are frozen (as peft does). Folds them away
    again, and gives their tensors and config in peft's format (`PEFT_TYPE`, the fields in `config`)."""

    PEFT_TYPE = ""
    LAYER: type = nn.Module
    KINDS: tuple[str, ...] = ()  # the tensor kinds peft saves

    def __init__(self, model: nn.Module, target_modules: str, rank: int, alpha: float, dropout: float):
        self.model = model.requires_grad_(False)
        self.config = dict(target_modules=target_modules, lora_alpha=alpha, lora_dropout=dropout)
        self.names = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
        for name in self.names:
            parent, _, child = name.rpartition(".")
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{self.PEFT_TYPE} target {name} is a {type(base).__name__}, not a linear")
            setattr(model.get_submodule(parent), child, self.LAYER(base, rank, alpha, dropout))
        if not self.names:
            raise ValueError(f"no module matches the {self.PEFT_TYPE} targets {target_modules}")

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
        tensors = {}
        for key, value in self.model.state_dict().items():
            if any(f".{kind}.{ADAPTER}" in key for kind in self.KINDS):
                name = key.replace(f".{ADAPTER}.", ".") if key.endswith(".weight") else key.removesuffix(f".{ADAPTER}")
                tensors[f"base_model.model.{name}"] = value.detach().cpu().contiguous()
        config = dict(peft_type=self.PEFT_TYPE, task_type=None, base_model_name_or_path=None, revision=None,
                      inference_mode=True, bias="none", fan_in_fan_out=False, init_lora_weights=True,
                      use_rslora=False, use_dora=False, lora_bias=False, modules_to_save=None, **self.config)
        return tensors, config


class LoraTuner(LowRankTuner):
    """Plain LoRA of rank `rank`, scaling alpha / rank."""

    PEFT_TYPE, LAYER, KINDS = "LORA", LoraLinear, ("lora_A", "lora_B")

    def __init__(self, model: nn.Module, target_modules: str, rank: int, alpha: float, dropout: float):
        super().__init__(model, target_modules, rank, alpha, dropout)
        self.config["r"] = rank


@dataclass
class AdaLoraSchedule:
    """AdaLoRA's rank-budget schedule, with peft's field names (and its defaults for beta1, beta2)."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    deltaT: int
    total_step: int
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


class AdaLoraTuner(LowRankTuner):
    """AdaLoRA layers of initial rank `schedule.init_r`; `rank_pattern` (layer lora_E name -> kept singular
    values, set by the rank budget) prunes what `peft_state` writes, as peft's own export does."""

    PEFT_TYPE, LAYER, KINDS = "ADALORA", AdaLoraLinear, ("lora_A", "lora_B", "lora_E")

    def __init__(self, model: nn.Module, target_modules: str, alpha: float, dropout: float,
                 schedule: AdaLoraSchedule):
        super().__init__(model, target_modules, schedule.init_r, alpha, dropout)
        self.schedule = schedule
        self.rank_pattern: Optional[dict[str, list[bool]]] = None

    def peft_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, config = super().peft_state()
        pattern = {name.replace(f".{ADAPTER}", ""): kept for name, kept in (self.rank_pattern or {}).items()}
        for name, kept in pattern.items():
            prefix = f"base_model.model.{name.removesuffix('.lora_E')}"
            for kind in ("lora_A", "lora_E"):
                tensors[f"{prefix}.{kind}"] = tensors[f"{prefix}.{kind}"][kept]
            tensors[f"{prefix}.lora_B"] = tensors[f"{prefix}.lora_B"][:, kept]
        config.update(rank_pattern=pattern or None, **asdict(self.schedule))
        return tensors, config
