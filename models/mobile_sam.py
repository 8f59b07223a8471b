"""MobileSAM (`-net mobile_sam -encoder tiny_vit`): a TinyViT encoder with SAM's prompt encoder and decoder."""
from __future__ import annotations

from .registry import register_net
from .sam import SamStyleSegmenter
from .segmenter import AdaptTargets
from .tiny_vit import TinyViT

# Regexes are full matches over the TinyViT module names (relative to the image encoder).
TINY_VIT_TARGETS = AdaptTargets(
    # fused qkv, proj and the MLP linears of every attention block; not the unused classifier `head`
    linears=r"layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
    attention=r"layers\.\d+\.blocks\.\d+\.attn",
    mlp=r"layers\.\d+\.blocks\.\d+\.mlp",
    # every block of every stage: the MBConv blocks of stage 0 and the attention blocks of stages 1-3
    blocks=r"layers\.\d+\.blocks\.\d+",
    # The patch embedding's two 3x3 convs and the 1x1 expand/project convs of the stage-0 MBConv blocks.
    # The depthwise `conv2` (groups = channels) is left out: peft 0.21.2's LoRA Conv2d requires the
    # rank to be divisible by `groups` (raises ValueError for r=4, groups=256), and its dense lora_A
    # would mix channels that the depthwise conv keeps apart.
    convs=r"patch_embed\.seq\.[02]\.c|layers\.0\.blocks\.\d+\.conv[13]\.c",
    # the convolutional stem and stage 0 (LiteMedSAM: at full input resolution) hold no adapter
    prefix=("patch_embed", "layers.0"),
)


def build_mobile_sam(image_size: int, num_classes: int, **overrides) -> SamStyleSegmenter:
    """MobileSAM `vit_t`; `overrides` are TinyViT arguments (tests use tiny ones)."""
    encoder = TinyViT(image_size=image_size, **overrides)
    return SamStyleSegmenter(encoder, TINY_VIT_TARGETS, image_size, num_classes)


register_net("mobile_sam", "tiny_vit", build_mobile_sam, default=True, adapt_targets=TINY_VIT_TARGETS,
             checkpoint_format="MobileSAM mobile_sam.pt: a flat state_dict")
