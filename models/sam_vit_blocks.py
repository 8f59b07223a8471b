"""segment-anything's ViT blocks, computing the same numbers with less work and keeping less for backward.

Window attention (`LeanAttention`): segment-anything pads the token grid to whole windows and runs
`qkv` and `proj` on every padded token too; at 256 px a 16 x 16 grid in 14 x 14 windows becomes 28 x 28,
three times the tokens. Here `qkv` runs on the real tokens and the padding gets what `qkv` gives a zero
token (its bias, plus whatever an adapter adds to a zero input), so the attention sees exactly the padded
windows it saw before; `proj` runs after the windows are merged back, on the real tokens only. Both are
per-token maps, so the results are the official ones (up to float rounding), and the Adapter that follows
the attention sees the same real-token outputs.

LoRA (and the Adapter beside the MLP) save the inputs of the linears they adapt. Two of them are cheap
functions of tensors autograd keeps anyway, so they are stored as recipes (models/saved_tensors.py): the
normed block input (from the block input, which LayerNorm keeps) and the normed MLP input (likewise), and
the GELU output (from GELU's input). The normed inputs are cast once for autocast, so a linear and its
LoRA branch share one low-precision copy. The attention output before `proj` is kept: rebuilding it
takes the attention's product with v again, which made the SAM ViT-B LoRA step 4-5% slower for 20 MB
(256 px, batch 2); the recipes lowered its peak by about 110 MB at no measurable cost.

`keep_less_for_backward` swaps the classes of an `ImageEncoderViT`'s blocks in place: no parameter,
buffer or module name changes, so official checkpoints load as before.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import (Attention, Block, ImageEncoderViT, add_decomposed_rel_pos,
                                                     window_partition, window_unpartition)
from torch import Tensor

from .saved_tensors import cast_for_matmul, saved_as_recipe


class LeanAttention(Attention):
    """`Attention` that, given `window_size`, attends within zero-padded windows of its B x H x W x C input,
    running `qkv` and `proj` on the real tokens only (module docstring)."""

    def forward(self, x: Tensor, window_size: int = 0) -> Tensor:
        if window_size == 0:
            return super().forward(x)
        batch, height, width, dim = x.shape
        padded_hw = (height + -height % window_size, width + -width % window_size)
        qkv = self.qkv(x)
        if padded_hw != (height, width):
            padding = self.qkv(x.new_zeros(1, 1, 1, dim))  # what a zero (padding) token gets
            qkv = torch.cat([qkv, padding.expand(batch, height, padded_hw[1] - width, -1)], dim=2)
            qkv = torch.cat([qkv, padding.expand(batch, padded_hw[0] - height, padded_hw[1], -1)], dim=1)
        windows = window_partition(qkv, window_size)[0]
        attended = self.attend(windows.flatten(1, 2), window_size)
        return self.proj(window_unpartition(attended, window_size, padded_hw, (height, width)))

    def attend(self, qkv: Tensor, side: int) -> Tensor:
        """Attention of (windows x side*side x 3C) qkv tokens -> windows x side x side x C, before `proj`."""
        windows, tokens, _ = qkv.shape
        q, k, v = qkv.reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).reshape(
            3, windows * self.num_heads, tokens, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (side, side), (side, side))
        out = attn.softmax(dim=-1) @ v
        return out.view(windows, self.num_heads, side, side, -1).permute(0, 2, 3, 1, 4).reshape(windows, side, side, -1)


class LeanMLPBlock(MLPBlock):
    """`MLPBlock` whose GELU output is rebuilt from its input (which GELU keeps)."""

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.lin1(x)
        activated = self.act(hidden)
        with saved_as_recipe(activated, lambda: self.act(hidden)):
            return self.lin2(activated)


class LeanBlock(Block):
    """`Block` whose attention works on the real tokens (`LeanAttention`) and whose normed attention and MLP
    inputs are rebuilt from the block input and the attention residual, which the LayerNorms keep."""

    def forward(self, x: Tensor) -> Tensor:
        normed = cast_for_matmul(self.norm1(x))
        dtype = normed.dtype  # the recipes must not hold `normed` itself
        with saved_as_recipe(normed, lambda: self.norm1(x).to(dtype)):
            residual = x + self.attn(normed, self.window_size)
        normed = cast_for_matmul(self.norm2(residual))
        with saved_as_recipe(normed, lambda: self.norm2(residual).to(dtype)):
            return residual + self.mlp(normed)


LEAN_CLASSES = {Block: LeanBlock, Attention: LeanAttention, MLPBlock: LeanMLPBlock}


def keep_less_for_backward(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Make the encoder's blocks, attentions and MLPs their lean subclasses (they add no state)."""
    for module in encoder.modules():
        lean = LEAN_CLASSES.get(type(module))
        if lean is not None:
            module.__class__ = lean
    return encoder
