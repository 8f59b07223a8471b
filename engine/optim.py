"""The optimizer of every training step (train.py and benchmark.py rows): AdamW, fused where it can be."""
from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch
from torch import nn

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Union[Iterable[nn.Parameter], list[dict]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel when every parameter is a floating tensor on a CPU or CUDA device
    (one kernel over all tensors instead of a loop of small ops per tensor: on the 2-core CPU a step over
    MobileSAM's 200 LoRA + decoder tensors took 5 ms instead of 14 ms); the per-tensor loop otherwise.
    `params`: parameters, or parameter groups as `learning_rate_groups` returns them."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def learning_rate_groups(model: nn.Module, lr: float, lr_ratios: Mapping[str, float]) -> list[dict]:
    """The trainable parameters of `model` as AdamW groups: those whose name holds a fragment of `lr_ratios`
    train at lr x its ratio (say AdaLoRA's singular values, "lora_E"), the rest at `lr`, in the first group."""
    rates: dict[float, list[nn.Parameter]] = {lr: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            ratio = next((r for fragment, r in lr_ratios.items() if fragment in name), 1.0)
            rates.setdefault(lr * ratio, []).append(param)
    return [{"params": params, "lr": rate} for rate, params in rates.items() if params]
