"""Adaptation modes (-mod): each declared once in `registry.py`, its code in its own file.

Each mode freezes what it does not train and returns an `Adaptation` (models/modes/adaptation.py)
that the engine asks for extra loss terms, per-step hooks, resumable state and a rank summary.
Importing this package is light (no torch, no peft): a mode's code is imported when it is applied.
"""
from .registry import ModeSpec, get_mode, mode_names, mode_options, register_mode


def apply_mode(segmenter, mode: str, total_steps: int, **options):
    """Adapt `segmenter` in place for `mode` with its declared options; `total_steps` drives schedules
    (AdaLoRA's budget). Returns the mode's `Adaptation`."""
    spec = get_mode(mode)
    unknown = sorted(set(options) - spec.options)
    if unknown:
        raise ValueError(f"mode {mode} takes no option {unknown[0]}; it takes {sorted(spec.options) or 'none'}")
    return spec.load_apply()(segmenter, total_steps, **options)


__all__ = ["ModeSpec", "apply_mode", "get_mode", "mode_names", "mode_options", "register_mode"]
