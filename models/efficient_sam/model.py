"""EfficientSAM ViT-T / ViT-S behind the PromptableSegmenter interface, and their registry entries."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from ..preprocess import standardise, stretch_scale, stretch_to_square, unstretch
from ..registry import register_net
from ..segmenter import PromptableSegmenter, Prompts
from .decoder import EfficientSamMaskDecoder
from .encoder import EFFICIENT_SAM_TARGETS, EfficientSamViT
from .prompt_encoder import EfficientSamPromptEncoder, prompt_points

PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics on 0..1 values
PIXEL_STD = (0.229, 0.224, 0.225)

EFFICIENT_SAM_ARCHS = {
    "vit_t": dict(embed_dim=192, num_heads=3, depth=12),
    "vit_s": dict(embed_dim=384, num_heads=6, depth=12),
}


class EfficientSamSegmenter(PromptableSegmenter):
    """EfficientSAM: plain-ViT encoder, point-only prompt encoder and GELU mask decoder.

    The state_dict equals the official model's (`image_encoder.*`, `prompt_encoder.*`,
    `mask_decoder.*`; `pixel_mean` / `pixel_std` are non-persistent buffers, as there).
    """

    def __init__(self, image_size: int, num_classes: int, embed_dim: int, num_heads: int, depth: int = 12,
                 mlp_ratio: float = 4.0):
        super().__init__(image_size, num_classes)
        self.image_encoder = EfficientSamViT(embed_dim, depth, num_heads, mlp_ratio)
        self.prompt_encoder = EfficientSamPromptEncoder()
        self.mask_decoder = EfficientSamMaskDecoder()
        self.adapt_targets = EFFICIENT_SAM_TARGETS
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, images: Tensor, valid_hw: Optional[Tensor] = None) -> Tensor:
        """0..255 images -> the valid area stretched to S x S (the official pipeline keeps no aspect ratio)
        -> /255 -> ImageNet mean/std -> encoder."""
        unit = stretch_to_square(images.to(self.pixel_mean.dtype), valid_hw) / 255.0
        return self.image_encoder(standardise(unit, None, self.pixel_mean, self.pixel_std))

    def forward(self, images: Optional[Tensor], prompts: Prompts, embeddings: Optional[Tensor] = None,
                valid_hw: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """As PromptableSegmenter.forward; with valid_hw the prompts are rescaled per axis into the stretched
        frame and the logits mapped back to the padded frame (valid area top-left, background elsewhere)."""
        if embeddings is None:
            embeddings = self.encode(images, valid_hw)
        if valid_hw is None:
            return self.decode(embeddings, prompts)
        scale = stretch_scale(valid_hw.to(embeddings.device), self.image_size)  # B x 2 (x, y)
        stretched = Prompts(
            points=None if prompts.points is None else prompts.points * scale[:, None, None, :],
            point_labels=prompts.point_labels,
            boxes=None if prompts.boxes is None else prompts.boxes * scale.repeat(1, 2)[:, None, :])
        logits, iou = self.decode(embeddings, stretched)
        return unstretch(logits, valid_hw, self.image_size), iou

    def decode_queries(self, embeddings: Tensor, prompts: Prompts, multimask: bool) -> tuple[Tensor, Tensor]:
        queries, _, height, width = embeddings.shape
        points, labels = prompt_points(prompts, queries, self.image_size, device=embeddings.device)
        sparse = self.prompt_encoder(points, labels).to(embeddings.dtype)
        image_pe = self.prompt_encoder.dense_pe(height, width).to(embeddings.dtype)
        return self.mask_decoder(embeddings, image_pe, sparse, multimask_output=multimask)


def build_efficient_sam(encoder: str, image_size: int, num_classes: int, **overrides) -> EfficientSamSegmenter:
    """EfficientSAM with the named encoder; `overrides` change the architecture (tests use tiny ones)."""
    return EfficientSamSegmenter(image_size, num_classes, **{**EFFICIENT_SAM_ARCHS[encoder], **overrides})


for _name in EFFICIENT_SAM_ARCHS:
    register_net("efficient_sam", _name, partial(build_efficient_sam, _name), unwrap_key="model",
                 default=_name == "vit_s", adapt_targets=EFFICIENT_SAM_TARGETS,
                 checkpoint_format=f"EfficientSAM efficient_sam_vit{_name[-1]}.pt: state_dict under the key 'model'")
