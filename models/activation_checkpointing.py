"""Recomputation in backward instead of storage: activation checkpointing of the image-encoder blocks declared
by each encoder's AdaptTargets, or only the hidden activations of TinyViT's MLPs."""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .saved_tensors import without_recipes
from .tiny_vit import Mlp


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


@contextlib.contextmanager
def _keep_batchnorm_statistics(norms: list[nn.Module]):
    """The recomputation in backward must not update BatchNorm running statistics a second time."""
    saved = [(norm, [buffer.clone() for buffer in norm.buffers(recurse=False)]) for norm in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in saved:
                for buffer, value in zip(norm.buffers(recurse=False), buffers):
                    buffer.copy_(value)


@contextlib.contextmanager
def _recomputation(norms: list[nn.Module]):
    with without_recipes(), _keep_batchnorm_statistics(norms):
        yield


def _checkpointed(block: nn.Module, forward):
    def contexts():
        norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        return without_recipes(), _recomputation(norms)

    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
        return forward(*args, **kwargs)
    return run


def enable_mlp_recompute(segmenter: nn.Module) -> int:
    """Let every TinyViT MLP of the image encoder rerun fc1 in backward (Mlp.recompute_hidden); returns the count."""
    mlps = [module for module in segmenter.image_encoder.modules() if isinstance(module, Mlp)]
    if not mlps:
        raise ValueError("the image encoder has no TinyViT MLP to recompute")
    for mlp in mlps:
        mlp.recompute_hidden = True
    return len(mlps)
