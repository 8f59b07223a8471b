"""segment-anything's ViT blocks, computing the same numbers with less work and keeping less for backward.

Window attention (`LeanAttention`): segment-anything pads the token grid to whole windows and runs
`qkv`, the attention and `proj` on every padded token too. Here `qkv` and `proj` run on the real tokens and
only they ask queries (models/windows.py), so the results are the official ones (up to float rounding).
The attention itself keeps only q, k and v for backward (`rel_pos_attention`).

LoRA (and the Adapter beside the MLP) save the inputs of the linears they adapt. Two of them are cheap
functions of tensors autograd keeps anyway, so they are stored as recipes (models/saved_tensors.py): the
normed block input (from the block input, which LayerNorm keeps) and the normed MLP input (likewise), and
the GELU output (from GELU's input). The normed inputs are cast once for autocast, so a linear and its
LoRA branch share one low-precision copy. The attention output before `proj` is kept: rebuilding it
takes the attention's product with v again, which made the SAM ViT-B LoRA step 4-5% slower for 20 MB
(256 px, batch 2); the recipes lowered its peak by about 110 MB at no measurable cost.

The patch embedding's output is made contiguous once (`TokenMajorPatchEmbed`), so the blocks work on
token-major memory.

`keep_less_for_backward` swaps the classes of an `ImageEncoderViT`'s blocks in place: no parameter,
buffer or module name changes, so official checkpoints load as before.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .layer_norm_2d import fuse_layer_norms_2d
from .rel_pos_attention import rel_pos_attention
from .saved_tensors import cast_for_matmul, saved_as_recipe
from .segment_anything_modeling import Attention, Block, ImageEncoderViT, MLPBlock, PatchEmbed, get_rel_pos
from .windows import assemble, needs_padding, span_keys, span_queries, window_spans


class LeanAttention(Attention):
    """`Attention` that, given `window_size`, attends within zero-padded windows of its B x H x W x C input,
    running `qkv` and `proj` on the real tokens and the attention on the real queries only (models/windows.py)."""

    def forward(self, x: Tensor, window_size: int = 0) -> Tensor:
        batch, height, width, dim = x.shape
        q, kv = self.qkv(x).split([dim, 2 * dim], dim=-1)
        if window_size == 0:
            attended = self.attend(q.flatten(1, 2), kv.flatten(1, 2), (height, width), (height, width))
            return self.proj(attended.view(batch, height, width, dim))
        side = window_size
        # a zero (padding) token's keys and values: qkv's bias, plus whatever an adapter adds to a zero input
        padding = self.qkv(x.new_zeros(1, dim))[0, dim:] if needs_padding(height, width, side) else None
        spans = window_spans(height, width, side)
        outputs = [[self.attend(span_queries(q, span), span_keys(kv, padding, span), span.query_grid, (side, side))
                    for span in row] for row in spans]
        return self.proj(assemble(outputs, spans, batch))

    def attend(self, q: Tensor, kv: Tensor, query_grid: tuple[int, int], key_grid: tuple[int, int]) -> Tensor:
        """Attention of (n x queries x C) q over (n x keys x 2C) keys and values, laid out on `query_grid`
        and `key_grid` (the queries in the top left of the key grid) -> n x queries x C, before `proj`."""
        count, queries, dim = q.shape
        heads = self.num_heads
        q = q.view(count, queries, heads, -1).transpose(1, 2).reshape(count * heads, queries, -1)
        k, v = kv.view(count, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4).reshape(
            2, count * heads, -1, dim // heads).unbind(0)
        if self.use_rel_pos:
            tables = [get_rel_pos(keys, keys, table)[:queries_on_axis] for queries_on_axis, keys, table
                      in zip(query_grid, key_grid, (self.rel_pos_h, self.rel_pos_w))]
            out = rel_pos_attention(q, k, v, *tables, query_grid, key_grid, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.view(count, heads, queries, -1).transpose(1, 2).reshape(count, queries, dim)


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


class TokenMajorPatchEmbed(PatchEmbed):
    """`PatchEmbed` whose B x H x W x C output is contiguous. segment-anything's is a permuted view of the
    conv's B x C x H x W output; every residual sum then inherits that channel-major layout, and every
    LayerNorm copies its input in forward, in backward and in a recipe."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).contiguous()


LEAN_CLASSES = {Block: LeanBlock, Attention: LeanAttention, MLPBlock: LeanMLPBlock, PatchEmbed: TokenMajorPatchEmbed}


def keep_less_for_backward(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Make the encoder's blocks, attentions and MLPs their lean subclasses and its neck's norms fused
    (they add no state)."""
    for module in encoder.modules():
        lean = LEAN_CLASSES.get(type(module))
        if lean is not None:
            module.__class__ = lean
    return fuse_layer_norms_2d(encoder)
