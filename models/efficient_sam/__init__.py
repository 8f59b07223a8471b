"""EfficientSAM (ViT-T, ViT-S): own encoder, prompt encoder and mask decoder; importing registers the nets."""
from .encoder import EFFICIENT_SAM_TARGETS, EfficientSamViT
from .model import EFFICIENT_SAM_ARCHS, EfficientSamSegmenter, build_efficient_sam

__all__ = ["EFFICIENT_SAM_ARCHS", "EFFICIENT_SAM_TARGETS", "EfficientSamSegmenter", "EfficientSamViT",
           "build_efficient_sam"]
