"""sam_lora / sam_dora: peft LoRA (or DoRA) on the encoder's attention and MLP linears."""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from .adaptation import Adaptation, freeze_all_but_decoder

DEFAULT_RANK = 4


def lora_target_regex(segmenter: nn.Module, with_convs: bool) -> str:
    """The encoder's declared linears, plus its convolutional stem when asked (-lora_conv)."""
    targets = segmenter.adapt_targets
    if with_convs and not targets.convs:
        raise ValueError("this encoder declares no convolutions for -lora_conv")
    return f"(?:{targets.linears})|(?:{targets.convs})" if with_convs else targets.linears


def _apply(segmenter: nn.Module, config, use_dora: bool) -> Adaptation:
    freeze_all_but_decoder(segmenter)
    rank = config.mid_dim or DEFAULT_RANK
    lora_config = LoraConfig(r=rank, lora_alpha=config.lora_alpha or rank, lora_dropout=config.lora_dropout,
                             target_modules=lora_target_regex(segmenter, config.lora_conv), use_dora=use_dora)
    tuner = LoraModel(segmenter.image_encoder, lora_config, "default")
    return Adaptation("sam_dora" if use_dora else "sam_lora", tuner=tuner)


def apply_lora(segmenter: nn.Module, config, total_steps: int) -> Adaptation:
    return _apply(segmenter, config, use_dora=False)


def apply_dora(segmenter: nn.Module, config, total_steps: int) -> Adaptation:
    return _apply(segmenter, config, use_dora=True)
