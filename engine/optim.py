"""The optimizer of every training step (train.py and benchmark.py rows): AdamW, fused where it can be."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Union

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


def steps_in_backward(saves_all: bool, amp: str, distributed: bool) -> bool:
    """Whether training steps each parameter during backward (`StepInBackward`): for full fine-tuning
    (`saves_all`: gradients as large as the model), unless fp16's gradient scaler must first see every
    gradient or DDP has yet to average them."""
    return saves_all and amp != "fp16" and not distributed


class StepInBackward:
    """Steps `optimizer` for each parameter as soon as backward has accumulated its gradient, then drops that
    gradient, so full fine-tuning never holds every gradient at once (SAM ViT-B: 360 MB). The update is
    the optimizer's own: AdamW's step for a tensor reads only that tensor's gradient and state, so the
    parameters come out exactly as from one step after backward. `on_gradient(param)` sees each gradient
    first (the trainer's probe of which parameters get one). Call `remove()` to stop."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_gradient: Optional[Callable[[nn.Parameter], None]] = None):
        self.optimizer, self.on_gradient = optimizer, on_gradient
        self.handles = [param.register_post_accumulate_grad_hook(self._step)
                        for group in optimizer.param_groups for param in group["params"]]

    def _step(self, param: nn.Parameter) -> None:
        if self.on_gradient is not None:
            self.on_gradient(param)
        self.optimizer.step()  # only `param` has a gradient now: each one is dropped right after its step
        param.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
