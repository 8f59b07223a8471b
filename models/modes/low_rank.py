"""A linear plus a low-rank update, `base(x) + scale * x down^T up^T`, computed without full-width passes
for the low-rank branch (the arithmetic of every LoRA and AdaLoRA layer here; no peft).

peft computes `base(x) + lora_B(lora_A(x)) * scaling` (AdaLoRA also divides by the rank): after B's
product, more passes over the full-width output (the scaling, the sum) and more in backward. Here:
- with a frozen float32 base outside autocast (LoRA's training step on CPU and GPU), `LowRankLinear`: where
  there are at least as many tokens as the weight's larger side, the forward and the input gradient each
  take one matrix product with the merged weight W + s B A (CPU BLAS runs the rank-wide products over all
  tokens several times slower than forming it); with fewer tokens (small nets at small batches), forming it
  costs more than it saves (it copies the whole weight), so the rank-wide products accumulate in place into
  the base's output and input gradient. A's and B's gradients are taken as (r x tokens) @ (tokens x
  features) products;
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


def merge_pays(tokens: int, weight: Tensor) -> bool:
    """Whether forming W + up @ down once per pass beats adding the rank-wide branch over the tokens. On a 2-core
    CPU (forward and backward, rank 4): merging was 3-17% slower at 256 tokens with 384-1536 features, and 2-9%
    faster at 4096-8192 tokens with 64-512 features; around tokens = features the two were within 4%."""
    return tokens >= max(weight.shape)


class LowRankLinear(torch.autograd.Function):
    """`x (W + up @ down)^T + b` for a frozen W and b, with gradients for x, down (r x in) and up (out x r).

    Where the merged weight is used (`merge_pays`), it is formed again in backward rather than saved: one
    rank-r product per layer, where keeping it would hold a copy of every adapted weight from forward to
    backward (SAM ViT-B: 300 MB of peak). Otherwise the forward keeps the rank-wide x down^T (tokens x r)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor, up: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        if merge_pays(len(tokens), weight):
            low_rank = None
            out = F.linear(tokens, torch.addmm(weight, up, down), bias)
        else:
            low_rank = tokens @ down.t()
            out = F.linear(tokens, weight, bias).addmm_(low_rank, thin_right(up).t())
        ctx.save_for_backward(x, weight, down, up, low_rank)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, down, up, low_rank = ctx.saved_tensors
        tokens, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        merged = low_rank is None
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[3] or (ctx.needs_input_grad[0] and not merged):
            grad_low_rank = grad @ thin_right(up)  # tokens x r
        if ctx.needs_input_grad[0]:
            grad_x = grad @ torch.addmm(weight, up, down) if merged else (grad @ weight).addmm_(grad_low_rank, down)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[3]:
            grad_down = grad_low_rank.t().mm(tokens)
        if ctx.needs_input_grad[4]:
            low_rank = tokens @ down.t() if merged else low_rank
            grad_up = low_rank.t().mm(grad).t().contiguous()
        return grad_x, None, None, grad_down, grad_up


def low_rank_linear(base: nn.Linear, x: Tensor, down: Tensor, up: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """`base(x) + scale * x down^T up^T`, through `LowRankLinear` where that is exact enough and faster."""
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    if frozen and x.dtype == base.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        return LowRankLinear.apply(x, base.weight, base.bias, down, up * scale)
    low_rank = F.linear(x, down)
    if isinstance(scale, Tensor):  # AdaLoRA's scale / rank: onto the rank-wide product
        low_rank, scale = low_rank * scale, 1.0
    return add_low_rank(base(x), low_rank, up, scale)
