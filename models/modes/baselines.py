"""Baselines: sam_full (everything trains) and sam_decoder (only the mask decoder trains)."""
from torch import nn

from .adaptation import Adaptation, freeze_all_but_decoder


def apply_full(segmenter: nn.Module, total_steps: int) -> Adaptation:
    segmenter.requires_grad_(True)
    return Adaptation("sam_full")


def apply_decoder_only(segmenter: nn.Module, total_steps: int) -> Adaptation:
    freeze_all_but_decoder(segmenter)
    return Adaptation("sam_decoder")
