"""SAM ViT-B/L/H (segment-anything's modules) behind the PromptableSegmenter interface."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frozen_prefix import install_frozen_prefix
from .layer_norm_2d import channels_last_weights
from .preprocess import standardise
from .registry import register_net
from .sam_vit_blocks import keep_less_for_backward
from .sam_decoder import SAM_PIXEL_MEAN, SAM_PIXEL_STD, BatchedMaskDecoder, sam_mask_decoder, sam_prompt_encoder
from .segment_anything_modeling import ImageEncoderViT, PromptEncoder
from .segmenter import AdaptTargets, PromptableSegmenter, Prompts


class SamStyleSegmenter(PromptableSegmenter):
    """An image encoder with SAM's prompt encoder and mask decoder (SAM ViT, MobileSAM, LiteMedSAM).

    `embedding_stride`: input pixels per embedding cell (16 for SAM and MobileSAM, 4 for LiteMedSAM).
    Images are standardised with SAM's pixel mean/std and padded with 0 afterwards.
    """

    def __init__(self, image_encoder: nn.Module, adapt_targets: AdaptTargets, image_size: int, num_classes: int,
                 embedding_stride: int = 16):
        super().__init__(image_size, num_classes)
        self.image_encoder = image_encoder
        self.prompt_encoder: PromptEncoder = sam_prompt_encoder(image_size, embedding_stride)
        self.mask_decoder: BatchedMaskDecoder = sam_mask_decoder()
        self.adapt_targets = adapt_targets
        install_frozen_prefix(image_encoder, adapt_targets.prefix)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: Tensor, valid_hw: Optional[Tensor]) -> Tensor:
        return standardise(images, valid_hw, self.pixel_mean, self.pixel_std)

    def encode(self, images: Tensor, valid_hw: Optional[Tensor] = None) -> Tensor:
        return self.image_encoder(self.normalise(images, valid_hw))

    def decode_queries(self, embeddings: Tensor, prompts: Prompts, multimask: bool) -> tuple[Tensor, Tensor]:
        points = None if prompts.points is None else (prompts.points, prompts.point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
        if sparse.shape[0] != embeddings.shape[0]:  # no prompt at all: one empty prompt per query
            sparse = sparse.expand(embeddings.shape[0], -1, -1)
            dense = dense.expand(embeddings.shape[0], -1, -1, -1)
        return self.mask_decoder(image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask)


# embed dim, depth, heads, global-attention blocks (segment-anything's build_sam.py)
SAM_VIT_ARCHS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}

SAM_VIT_TARGETS = AdaptTargets(
    linears=r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.lin[12])",
    attention=r"blocks\.\d+\.attn",
    mlp=r"blocks\.\d+\.mlp",
    blocks=r"blocks\.\d+",
)


def sam_vit_encoder(image_size: int, embed_dim: int, depth: int, num_heads: int,
                    global_attn_indexes: tuple[int, ...]) -> ImageEncoderViT:
    encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, mlp_ratio=4, out_chans=256, qkv_bias=True,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
                              global_attn_indexes=global_attn_indexes)
    channels_last_weights(encoder.neck)
    return keep_less_for_backward(encoder)


def build_sam_vit(encoder: str, image_size: int, num_classes: int, **overrides) -> SamStyleSegmenter:
    """SAM with a ViT encoder; `overrides` change the architecture (tests use tiny ones)."""
    arch = {**SAM_VIT_ARCHS[encoder], **overrides}
    return SamStyleSegmenter(sam_vit_encoder(image_size, **arch), SAM_VIT_TARGETS, image_size, num_classes)


def resize_sam_position_tables(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Interpolate the absolute position embedding (bicubic) and the relative-position tables
    (linear) of an official SAM checkpoint to the model's image size; other keys pass unchanged."""
    return resize_position_tables(state_dict, {k: v.shape for k, v in model.state_dict().items()})


def resize_position_tables(state_dict: dict[str, Tensor], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Interpolate the position tables of `state_dict` to `shapes` (key -> wanted shape; also used in
    reverse by models/export.py to give a run's tables the official 1024-px shapes)."""
    resized = dict(state_dict)
    for key, value in state_dict.items():
        if key not in shapes or tuple(shapes[key]) == tuple(value.shape):
            continue
        if key.endswith("image_encoder.pos_embed"):
            grid = tuple(shapes[key][1:3])
            resized[key] = F.interpolate(value.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic",
                                         align_corners=False).permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and value.shape[1] == shapes[key][1]:
            length = shapes[key][0]
            resized[key] = F.interpolate(value.t()[None].float(), size=length, mode="linear",
                                         align_corners=False)[0].t().to(value.dtype)
    return resized


for _name in SAM_VIT_ARCHS:
    register_net("sam", _name, partial(build_sam_vit, _name), checkpoint_filter=resize_sam_position_tables,
                 checkpoint_format="segment-anything sam_vit_*.pth: a flat state_dict",
                 default=_name == "vit_b", adapt_targets=SAM_VIT_TARGETS)
