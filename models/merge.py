"""Fold LoRA / DoRA / AdaLoRA weights into the base linears, leaving the net's official layout."""
from __future__ import annotations

from torch import nn

from .modes import get_mode
from .modes.adaptation import Adaptation
from .registry import net_entry


def merge_adapters(adaptation: Adaptation) -> bool:
    """Merge the peft tuners into the encoder (and decoder) in place; afterwards no adapter code runs.
    Returns whether anything merged (False for modes without adapters: sam_full, sam_decoder train the
    base tensors).

    Raises ValueError for a mode whose weights are not a linear update of the base weights."""
    if not get_mode(adaptation.mode).mergeable:
        raise ValueError(f"mode {adaptation.mode} cannot be merged: its adapters are not a linear update of any "
                         f"base weight (a nonlinearity sits between their projections); evaluate it unmerged")
    merged = False
    for attribute in ("tuner", "decoder_tuner"):
        tuner = getattr(adaptation, attribute)
        if tuner is not None:
            tuner.merge_and_unload()
            setattr(adaptation, attribute, None)
            merged = True
    return merged


def official_state(model: nn.Module, net: str, encoder: str) -> dict:
    """The merged model's state dict wrapped as the net's official checkpoint file is."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    unwrap_key = net_entry(net, encoder).unwrap_key
    return {unwrap_key: state} if unwrap_key else state
