"""segment-anything's ViT blocks, computing the same numbers but keeping less for backward.

LoRA (and the Adapter beside the MLP) save the inputs of the linears they adapt. Three of them are
cheap functions of tensors autograd keeps anyway, so they are stored as recipes (models/saved_tensors.py):
the normed, window-partitioned block input (from the block input, which LayerNorm keeps), the normed MLP
input (likewise) and the GELU output (from GELU's input). The normed inputs are cast once for autocast,
so a linear and its LoRA branch share one low-precision copy. The attention output before `proj` is kept:
rebuilding it takes the attention's product with v again, which made the SAM ViT-B LoRA step 4-5% slower
for 20 MB (256 px, batch 2); the three recipes lowered its peak by about 110 MB at no measurable cost.

`keep_less_for_backward` swaps the classes of an `ImageEncoderViT`'s blocks in place: no parameter,
buffer or module name changes, so official checkpoints load as before.
"""
from __future__ import annotations

from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition
from torch import Tensor

from .saved_tensors import cast_for_matmul, saved_as_recipe


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


LEAN_CLASSES = {Block: LeanBlock, MLPBlock: LeanMLPBlock}


def keep_less_for_backward(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Make the encoder's blocks and MLPs their lean subclasses (they add no state)."""
    for module in encoder.modules():
        lean = LEAN_CLASSES.get(type(module))
        if lean is not None:
            module.__class__ = lean
    return encoder
