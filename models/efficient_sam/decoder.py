"""EfficientSAM's mask decoder: SAM's two-way transformer design with GELU MLPs, a GroupNorm in
the upscaling path, no dense prompt, and one image embedding per query (no tiling here: the
segmenter already gives each query its own embedding). Key names follow the official checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..decoder_tokens import query_tokens

EMBED_DIM = 256
NUM_MASK_TOKENS = 4  # token 0: single-mask output, tokens 1..3: multimask outputs
UPSCALING_DIMS = (64, 32)


class MLPBlock(nn.Module):
    """`num_layers` Linear+GELU layers (`layers.i.0`) followed by a plain Linear (`fc`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(dims, dims[1:]))
        self.fc = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to dim / downsample channels.
    The logits are multiplied by 1/sqrt(head_dim), as the official code does."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.inv_sqrt_head_dim = 1.0 / math.sqrt(inner / num_heads)

    def _split(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        return x.view(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        weights = ((q @ k.transpose(-2, -1)) * self.inv_sqrt_head_dim).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention.

    Self-attention differs from SAM's: after the first layer the token PE is added to the queries
    themselves (so it also reaches the values and the residual), and the first layer keeps its residual.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool):
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, dim, num_layers=1)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if not self.skip_first_pe:  # unlike SAM, the PE stays in the residual stream, and layer 0 keeps its residual
            queries = queries + query_pe
        queries = self.norm1(queries + self.self_attn(queries, queries, queries))
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = EMBED_DIM, num_heads: int = 8, mlp_dim: int = 2048,
                 downsample: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, downsample, skip_first_pe=i == 0)
                                    for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image Q x C x h x w, image_pe 1 x C x h x w, tokens Q x T x C -> (Q x T x C, Q x hw x C)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attended = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attended), keys


def _upscaling_stage(in_dim: int, out_dim: int, last: bool) -> nn.Sequential:
    norm = nn.Identity() if last else nn.GroupNorm(1, out_dim)
    return nn.Sequential(nn.ConvTranspose2d(in_dim, out_dim, kernel_size=2, stride=2), norm, nn.GELU())


class EfficientSamMaskDecoder(nn.Module):
    """Q image embeddings + Q x N x 256 sparse prompts -> (Q x M x 4h x 4w logits, Q x M IoU)."""

    # `-decoder lora`: the two-way transformer's attention projections and MLP linears (module names)
    lora_targets = (r"transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
                    r"|final_attn_token_to_image)\.(q|k|v|out)_proj|transformer\.layers\.\d+\.mlp\.(layers\.0\.0|fc)")

    def __init__(self, dim: int = EMBED_DIM, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256):
        super().__init__()
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        dims = (dim, *UPSCALING_DIMS)
        self.final_output_upscaling_layers = nn.ModuleList(
            _upscaling_stage(a, b, last=i == len(UPSCALING_DIMS) - 1) for i, (a, b) in enumerate(zip(dims, dims[1:])))
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLPBlock(dim, dim, UPSCALING_DIMS[-1], num_layers=2) for _ in range(NUM_MASK_TOKENS))
        self.iou_prediction_head = MLPBlock(dim, iou_head_hidden_dim, NUM_MASK_TOKENS, num_layers=iou_head_depth - 1)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                multimask_output: bool) -> tuple[Tensor, Tensor]:
        tokens = query_tokens(self.iou_token, self.mask_tokens, image_embeddings, sparse_prompt_embeddings)
        batch, channels, height, width = image_embeddings.shape
        hidden, image = self.transformer(image_embeddings, image_pe, tokens)
        upscaled = image.transpose(1, 2).reshape(batch, channels, height, width)
        for stage in self.final_output_upscaling_layers:
            upscaled = stage(upscaled)
        mask_tokens = hidden[:, 1:1 + NUM_MASK_TOKENS]
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        up_channels, up_h, up_w = upscaled.shape[1:]
        masks = (hyper @ upscaled.reshape(batch, up_channels, up_h * up_w)).view(batch, -1, up_h, up_w)
        iou = self.iou_prediction_head(hidden[:, 0])
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]
