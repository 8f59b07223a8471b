"""EfficientSAM's image encoder: a plain ViT (global attention in every block) plus SAM's neck.

Module and parameter names follow the official checkpoints (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.mlp.fc1`, `neck.0..3`, ...). The position table keeps its 224-pixel pretraining layout
(1, 1 + 14*14, D); at every forward the cls slot is dropped and the 14 x 14 grid is resized bicubically
to the token grid, so one checkpoint works for every image size that is a multiple of 16.

The normed block inputs and the GELU output, which the adapted linears save for backward, are stored as
recipes (models/saved_tensors.py), as in TinyViT and SAM's ViT. The attention output needs none: torch's
fused kernel lays it out token-major, so `proj`'s input is a view of the output the kernel keeps anyway.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer_norm_2d import LayerNorm2d, channels_last_weights  # channel LayerNorm, eps 1e-6
from ..saved_tensors import cast_for_matmul, saved_as_recipe
from ..segmenter import AdaptTargets

PATCH_SIZE = 16
PRETRAIN_GRID = 14  # 224-pixel pretraining / 16-pixel patches
NECK_DIM = 256

EFFICIENT_SAM_TARGETS = AdaptTargets(
    linears=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
    attention=r"blocks\.\d+\.attn",
    mlp=r"blocks\.\d+\.mlp",
    blocks=r"blocks\.\d+",
    convs="",
)


class PatchEmbed(nn.Module):
    """16 x 16 patches -> B x D x H/16 x W/16."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Global multi-head self-attention; qkv laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        activated = self.act(hidden)
        with saved_as_recipe(activated, lambda: self.act(hidden)):
            return self.fc2(activated)


class Block(nn.Module):
    """Pre-norm transformer block on B x N x D tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        normed = cast_for_matmul(self.norm1(x))
        dtype = normed.dtype  # the recipes must not hold `normed` itself
        with saved_as_recipe(normed, lambda: self.norm1(x).to(dtype)):
            residual = x + self.attn(normed)
        normed = cast_for_matmul(self.norm2(residual))
        with saved_as_recipe(normed, lambda: self.norm2(residual).to(dtype)):
            return residual + self.mlp(normed)


class EfficientSamViT(nn.Module):
    """B x 3 x S x S normalised images -> B x 256 x S/16 x S/16 embeddings."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, in_chans: int = 3):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID * PRETRAIN_GRID, embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.neck = channels_last_weights(nn.Sequential(
            nn.Conv2d(embed_dim, NECK_DIM, kernel_size=1, bias=False),
            LayerNorm2d(NECK_DIM),
            nn.Conv2d(NECK_DIM, NECK_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(NECK_DIM),
        ))

    def position_grid(self, height: int, width: int) -> Tensor:
        """The pretraining position grid (cls slot dropped), bicubically resized: 1 x D x height x width."""
        table = self.pos_embed[:, 1:]
        side = math.isqrt(table.shape[1])
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (height, width) != (side, side):
            grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        batch, dim, height, width = x.shape
        # token-major memory: otherwise every residual sum inherits the conv's channel-major layout and each
        # LayerNorm copies its input (forward, backward and recipe)
        x = (x + self.position_grid(height, width)).flatten(2).transpose(1, 2).contiguous()
        for block in self.blocks:
            x = block(x)
        return self.neck(x.transpose(1, 2).reshape(batch, dim, height, width))
