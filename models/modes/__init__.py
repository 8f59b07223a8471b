"""Adaptation modes (-mod): name -> function that adapts a segmenter in place.

Each mode freezes what it does not train and returns an `Adaptation` that the engine asks for
extra loss terms, per-step hooks, resumable state and a rank summary.
"""
from .adapter import apply_adapter
from .adaptation import Adaptation, parameter_table
from .adalora import apply_adalora
from .baselines import apply_decoder_only, apply_full
from .lora import apply_dora, apply_lora

MODE_BUILDERS = {
    "sam_adpt": apply_adapter,
    "sam_lora": apply_lora,
    "sam_dora": apply_dora,
    "sam_adalora": apply_adalora,
    "sam_full": apply_full,
    "sam_decoder": apply_decoder_only,
}


def apply_mode(segmenter, config, total_steps: int) -> Adaptation:
    """Adapt `segmenter` in place for `config.mod`; `total_steps` drives AdaLoRA's budget schedule."""
    return MODE_BUILDERS[config.mod](segmenter, config, total_steps)


__all__ = ["Adaptation", "MODE_BUILDERS", "apply_mode", "parameter_table"]
