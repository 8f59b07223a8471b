"""segment-anything's ViT blocks, computing the same numbers but keeping less for backward.

LoRA (and the Adapter beside the MLP) save the inputs of the linears they adapt: the normed (and
window-partitioned) block input, the attention output before `proj`, the normed MLP input and the GELU
output. Each is a cheap function of a tensor autograd keeps anyway, so each is stored as a recipe
(models/saved_tensors.py): on SAM ViT-B at 256 px that is about 15 MB per block and image pair. The
normed inputs are cast once for autocast, so a linear and its LoRA branch share one low-precision copy.

`keep_less_for_backward` swaps the classes of an `ImageEncoderViT`'s blocks in place: no parameter,
buffer or module name changes, so official checkpoints load as before.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import (Attention, Block, ImageEncoderViT, add_decomposed_rel_pos,
                                                     window_partition, window_unpartition)
from torch import Tensor

from .saved_tensors import cast_for_matmul, same_autocast, saved_as_recipe


class LeanAttention(Attention):
    """`Attention` whose `proj` input is rebuilt from what the attention product keeps (softmax output, v)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        attn = attn.softmax(dim=-1)
        autocast_now = same_autocast(x.device.type)

        def heads_merged() -> Tensor:
            with autocast_now():
                out = attn @ v
            return out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(
                batch, height, width, -1)

        merged = heads_merged()
        with saved_as_recipe(merged, heads_merged):
            return self.proj(merged)


class LeanMLPBlock(MLPBlock):
    """`MLPBlock` whose GELU output is rebuilt from its input (which GELU keeps)."""

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.lin1(x)
        activated = self.act(hidden)
        with saved_as_recipe(activated, lambda: self.act(hidden)):
            return self.lin2(activated)


class LeanBlock(Block):
    """`Block` whose normed (window-partitioned) attention input and normed MLP input are rebuilt from the
    block's input and the attention residual, which the LayerNorms keep."""

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1], x.shape[2]
        normed = cast_for_matmul(self.norm1(x))
        dtype = normed.dtype  # the recipes must not hold `normed` itself

        def windowed(normed: Tensor) -> Tensor:
            return window_partition(normed, self.window_size)[0] if self.window_size > 0 else normed

        windows = windowed(normed)
        with saved_as_recipe(windows, lambda: windowed(self.norm1(x).to(dtype))):
            attended = self.attn(windows)
        if self.window_size > 0:
            padded = (height + -height % self.window_size, width + -width % self.window_size)
            attended = window_unpartition(attended, self.window_size, padded, (height, width))
        residual = x + attended
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
