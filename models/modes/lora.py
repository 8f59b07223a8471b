"""sam_lora / sam_dora: LoRA (the project's own layer, lora_layer.py) or DoRA (peft's) on the encoder's
attention and MLP linears; with `lora_conv`, peft's LoRA also on the declared convolutions."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .adaptation import Adaptation, freeze_all_but_decoder, take_autocast_inputs_as_given
from .lora_layer import LoraTuner

DEFAULT_RANK = 4


def lora_target_regex(segmenter: nn.Module, with_convs: bool) -> str:
    """The encoder's declared linears, plus the convolutions it declares when asked (`lora_conv`)."""
    targets = segmenter.adapt_targets
    if with_convs and not targets.convs:
        raise ValueError("lora_conv: this encoder declares no convolutions to adapt")
    return f"(?:{targets.linears})|(?:{targets.convs})" if with_convs else targets.linears


def _apply(segmenter: nn.Module, use_dora: bool, mid_dim: Optional[int], lora_alpha: Optional[float],
           lora_dropout: float, lora_conv: bool, decoder: str) -> Adaptation:
    rank = mid_dim or DEFAULT_RANK
    decoder_tuner = freeze_all_but_decoder(segmenter, decoder, rank)
    targets = lora_target_regex(segmenter, lora_conv)
    if use_dora or lora_conv:  # peft's layers: DoRA's magnitude, LoRA on convolutions
        from peft.tuners.lora import LoraModel

        from .fused_lora import fused_lora_config

        config = fused_lora_config(r=rank, lora_alpha=lora_alpha or rank, lora_dropout=lora_dropout,
                                   target_modules=targets, use_dora=use_dora)
        tuner = take_autocast_inputs_as_given(LoraModel(segmenter.image_encoder, config, "default"))
    else:
        tuner = LoraTuner(segmenter.image_encoder, targets, rank, lora_alpha or rank, lora_dropout)
    return Adaptation("sam_dora" if use_dora else "sam_lora", tuner=tuner, decoder_tuner=decoder_tuner)


def apply_lora(segmenter: nn.Module, total_steps: int, **options) -> Adaptation:
    """options: mid_dim (rank, None: 4), lora_alpha (None: the rank), lora_dropout, lora_conv, decoder
    (full | lora | frozen; decoder LoRA uses the same rank)."""
    return _apply(segmenter, False, **options)


def apply_dora(segmenter: nn.Module, total_steps: int, **options) -> Adaptation:
    """DoRA: LoRA plus a trained magnitude vector per adapted linear; the options of `apply_lora`."""
    return _apply(segmenter, True, **options)
