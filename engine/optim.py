"""The optimizer of every training step (train.py and benchmark.py rows): AdamW, fused where it can be."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

FUSED_DEVICES = ("cpu", "cuda")
BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults
HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps")


class FusedAdamW:
    """torch.optim.AdamW(fused=True): the same kernel, update, per-parameter state and state_dict layout, so
    either loads the other's state. It is not built on torch.optim because every torch.optim optimizer
    imports torch's compiler stack (torch._dynamo with sympy and triton) when it is built or stepped: about
    155 MB of resident memory and 1.5 s on the 2-core CPU, for a feature no training step here uses."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float):
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": BETAS, "eps": EPS}
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def _state(self, param: Tensor) -> dict[str, Tensor]:
        if param not in self.state:
            self.state[param] = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                                 "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
        return self.state[param]

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step for every parameter holding a gradient (the others keep their state)."""
        for group in self.param_groups:
            by_device = defaultdict(list)  # the kernel takes tensors of one device and dtype
            for param in group["params"]:
                if param.grad is not None:
                    by_device[(param.device, param.dtype)].append(param)
            for params in by_device.values():
                states = [self._state(p) for p in params]
                steps = [state["step"] for state in states]
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, [p.grad for p in params], [state["exp_avg"] for state in states],
                                    [state["exp_avg_sq"] for state in states], [], steps, lr=group["lr"],
                                    beta1=group["betas"][0], beta2=group["betas"][1],
                                    weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                    maximize=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters numbered in group order, state under those numbers."""
        number = {}
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [number.setdefault(p, len(number)) for p in group["params"]]}
                  for group in self.param_groups]
        return {"state": {number[p]: state for p, state in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Load `state_dict()`'s output, ours or torch.optim.AdamW's, for the same parameter groups."""
        sizes = [len(group["params"]) for group in saved["param_groups"]]
        if sizes != [len(group["params"]) for group in self.param_groups]:
            raise ValueError(f"the saved optimizer state has groups of {sizes} parameters, this optimizer "
                             f"{[len(group['params']) for group in self.param_groups]}")
        self.state = {}
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            group.update({key: saved_group[key] for key in HYPERPARAMETERS})
            for param, number in zip(group["params"], saved_group["params"]):
                if number in saved["state"]:
                    state = saved["state"][number]
                    self.state[param] = {"step": state["step"].to(param.device, torch.float32),
                                         "exp_avg": state["exp_avg"].to(param.device, param.dtype),
                                         "exp_avg_sq": state["exp_avg_sq"].to(param.device, param.dtype)}


def adamw(params: Union[Iterable[nn.Parameter], list[dict]], lr: float,
          weight_decay: float) -> Union[FusedAdamW, torch.optim.AdamW]:
    """AdamW with torch's fused kernel (`FusedAdamW`) when every parameter is a floating tensor on a CPU or
    CUDA device (one kernel over all tensors instead of a loop of small ops per tensor: on the 2-core CPU a
    step over MobileSAM's 200 LoRA + decoder tensors took 5 ms instead of 14 ms); torch's per-tensor loop
    otherwise. `params`: parameters, or parameter groups as `learning_rate_groups` returns them."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    if all(p.is_floating_point() and p.device.type in FUSED_DEVICES for g in groups for p in g["params"]):
        return FusedAdamW(groups, lr, weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=False)


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

    def __init__(self, optimizer: Union[FusedAdamW, torch.optim.Optimizer],
                 on_gradient: Optional[Callable[[nn.Parameter], None]] = None):
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
