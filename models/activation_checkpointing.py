"""Activation checkpointing of the image-encoder blocks declared by each encoder's AdaptTargets."""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_activation_checkpointing(segmenter: nn.Module) -> int:
    """Recompute each encoder block's activations in backward instead of storing them; returns the count.

    The block's own `forward` is wrapped on the instance, so module names and state-dict keys stay
    the same and every mode's adapters (inside the blocks) are recomputed with them.
    """
    count = 0
    for name, block in segmenter.image_encoder.named_modules():
        if re.fullmatch(segmenter.adapt_targets.blocks, name):
            block.forward = _checkpointed(block, block.forward)
            count += 1
    if count == 0:
        raise ValueError("no encoder block matched the encoder's declared block pattern")
    return count


def _checkpointed(block: nn.Module, forward):
    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run
