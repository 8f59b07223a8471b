"""A linear plus a low-rank update, `base(x) + scale * x down^T up^T`, computed without full-width passes
for the low-rank branch (the arithmetic of every LoRA and AdaLoRA layer here; no peft).

peft computes `base(x) + lora_B(lora_A(x)) * scaling` (AdaLoRA also divides by the rank): after B's
product, more passes over the full-width output (the scaling, the sum) and more in backward. Here:
- with a frozen float32 base outside autocast (LoRA's training step on CPU and GPU), `LowRankLinear`: the
  forward and the input gradient each take one matrix product with the merged weight W + s B A, and A's
  and B's gradients are taken as (r x tokens) @ (tokens x features) products; CPU BLAS runs the products
  autograd would take instead, with r as an inner or outer dimension over all tokens, several times slower;
- otherwise (autocast, where a merged weight would round the small update away, or a trainable base) the
  scaling goes onto the rank-wide product or into `addmm`'s alpha, and B's product accumulates into the
  base output as one `addmm`.
Every product over the tokens whose right factor is rank-wide (features x r) gets that factor column-major
(`thin_right`): MKL takes 4-5x longer over a row-major one (3136 tokens x 480 features times 480 x 4: 0.87
against 0.18 ms on a 2-core CPU).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def thin_right(factor: Tensor) -> Tensor:
    """A features x r factor, r small, as a column-major view (a copy of r x features values)."""
    return factor.t().contiguous().t()


def add_low_rank(out: Tensor, low_rank: Tensor, up: Tensor, alpha: float = 1.0) -> Tensor:
    """`out + alpha * low_rank @ up^T` as one addmm over the flattened tokens (whose backward's product
    `grad @ up` gets `up` column-major)."""
    up_t = thin_right(up).t()  # row-major r x out: the transpose backward takes is column-major
    fused = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), up_t, alpha=alpha)
    return fused.view(out.shape)


class LowRankLinear(torch.autograd.Function):
    """`x (W + up @ down)^T + b` for a frozen W and b, with gradients for x, down (r x in) and up (out x r).

    The merged weight is formed again in backward rather than saved: one rank-r product per layer, where
    keeping it would hold a copy of every adapted weight from forward to backward (SAM ViT-B: 300 MB of peak)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, down, up)
        out = F.linear(x.reshape(-1, x.shape[-1]), torch.addmm(weight, up, down), bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, down, up = ctx.saved_tensors
        tokens, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ torch.addmm(weight, up, down)).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_down = (grad @ thin_right(up)).t().mm(tokens) if ctx.needs_input_grad[3] else None
        grad_up = (tokens @ down.t()).t().mm(grad).t().contiguous() if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_down, grad_up


def low_rank_linear(base: nn.Linear, x: Tensor, down: Tensor, up: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """`base(x) + scale * x down^T up^T`, merged (`LowRankLinear`) where that is exact enough and faster."""
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    if frozen and x.dtype == base.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        return LowRankLinear.apply(x, base.weight, base.bias, down, up * scale)
    low_rank = F.linear(x, down)
    if isinstance(scale, Tensor):  # AdaLoRA's scale / rank: onto the rank-wide product
        low_rank, scale = low_rank * scale, 1.0
    return add_low_rank(base(x), low_rank, up, scale)
