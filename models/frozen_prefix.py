"""The frozen prefix of an image encoder: the leading modules that precede every adapter (TinyViT's
patch embedding and convolutional stage 0, declared as AdaptTargets.prefix).

While none of a prefix module's parameters requires a gradient (every PEFT mode without -lora_conv, and
sam_decoder), it runs without building autograd state (torch.no_grad) and in channels-last memory
format, which halved the time of LiteMedSAM's full-resolution stage 0 on a CPU (README, Speed). Full
fine-tuning and -lora_conv (trainable prefix parameters) run it as before. Forward hooks, not wrapped
forwards, so module names, state-dict keys and deep copies stay as they are.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ENABLED = True  # tests compare against the plain path
_STATE = "_frozen_prefix_grad"  # the grad mode to restore after the module, set by the pre-hook


def prefix_is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def _before(module: nn.Module, args: tuple):
    x = args[0]
    if not ENABLED or _exporting() or not isinstance(x, Tensor) or x.dim() != 4 or x.requires_grad or not prefix_is_frozen(module):
        return None
    setattr(module, _STATE, torch.is_grad_enabled())
    torch.set_grad_enabled(False)
    return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def _after(module: nn.Module, args: tuple, output):
    grad = module.__dict__.pop(_STATE, None)
    if grad is not None:
        torch.set_grad_enabled(grad)
    return None


def install_frozen_prefix(encoder: nn.Module, names: tuple[str, ...]) -> int:
    """Hook the named modules of `encoder`; returns how many were hooked."""
    modules = dict(encoder.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"frozen-prefix modules not in the encoder: {', '.join(missing)}")
    for name in names:
        modules[name].register_forward_pre_hook(_before)
        modules[name].register_forward_hook(_after, always_call=True)
    return len(names)
