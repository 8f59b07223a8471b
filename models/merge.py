"""Fold LoRA / DoRA / AdaLoRA weights into the base linears, leaving the net's official layout."""
from __future__ import annotations

from torch import nn

from common.errors import UserError

from .modes import Adaptation
from .registry import net_entry


def merge_adapters(adaptation: Adaptation) -> None:
    """Merge the peft tuner into the encoder in place; afterwards no adapter code runs."""
    if adaptation.mode == "sam_adpt":
        raise UserError("-mod sam_adpt cannot be merged: its Adapters apply a GELU between their projections, so "
                        "they are not a linear update of any base weight; evaluate without -merge")
    if adaptation.tuner is not None:
        adaptation.tuner.merge_and_unload()
        adaptation.tuner = None


def official_state(model: nn.Module, net: str, encoder: str) -> dict:
    """The merged model's state dict wrapped as the net's official checkpoint file is."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    unwrap_key = net_entry(net, encoder).unwrap_key
    return {unwrap_key: state} if unwrap_key else state
