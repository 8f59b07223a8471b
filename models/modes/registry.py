"""Every adaptation mode (-mod) declared once: name, accepted options and what the rest of the toolkit
needs to know about it. Light on purpose (no torch, no peft): cfg.py reads it to build `-mod` and to
check the mode-specific flags, and `apply` is imported only when a mode is applied.

A new mode (say VeRA) is one file with its `apply_*` function and one `register_mode` line below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

LORA_OPTIONS = frozenset({"mid_dim", "lora_alpha", "lora_dropout", "lora_conv", "decoder"})
ADALORA_OPTIONS = frozenset({"lora_alpha", "lora_dropout", "adalora_init_r", "adalora_target_r", "adalora_tinit",
                             "adalora_tfinal", "adalora_delta_t", "adalora_orth_reg", "adalora_init",
                             "adalora_e_lr_ratio", "decoder"})


@dataclass(frozen=True)
class ModeSpec:
    """What one adaptation mode is.

    name: the -mod value.
    apply: "module:function" of `function(segmenter, total_steps, **options) -> Adaptation`, imported lazily.
    options: the mode-specific options `apply` takes as keywords (they are also its CLI flag names);
        any other mode-specific option is refused for this mode.
    trains_encoder: gradients flow through the image encoder (activation checkpointing helps; its
        embeddings cannot be cached).
    saves_all: its weights file holds every tensor (full fine-tuning), not only the trainable ones.
    mergeable: its trained weights fold into the base net's official layout (nothing to fold counts).
    adapter_prefix: fragments of the parameter names the mode adds to the encoder (peft's `prefix`),
        used to count adapter parameters apart from the encoder's own.
    compared_by_default: part of compare.py's default -mods list.
    """

    name: str
    apply: str
    options: frozenset = frozenset()
    trains_encoder: bool = True
    saves_all: bool = False
    mergeable: bool = True
    adapter_prefix: tuple[str, ...] = ()
    compared_by_default: bool = True

    def load_apply(self) -> Callable:
        module, _, function = self.apply.partition(":")
        return getattr(importlib.import_module(module), function)


_MODES: dict[str, ModeSpec] = {}


def register_mode(spec: ModeSpec) -> ModeSpec:
    if spec.name in _MODES:
        raise ValueError(f"mode {spec.name} is registered twice")
    _MODES[spec.name] = spec
    return spec


def get_mode(name: str) -> ModeSpec:
    if name not in _MODES:
        raise KeyError(f"unknown mode {name}; registered: {', '.join(_MODES)}")
    return _MODES[name]


def mode_names() -> list[str]:
    """Registered modes in registration order."""
    return list(_MODES)


def mode_options() -> frozenset:
    """Every mode-specific option: each is accepted only by the modes that declare it."""
    return frozenset().union(*(spec.options for spec in _MODES.values()))


register_mode(ModeSpec("sam_adpt", "models.modes.adapter:apply_adapter", frozenset({"mid_dim", "decoder"}),
                       mergeable=False,
                       adapter_prefix=(".adapter.",)))
register_mode(ModeSpec("sam_lora", "models.modes.lora:apply_lora", LORA_OPTIONS, adapter_prefix=(".lora_",)))
register_mode(ModeSpec("sam_adalora", "models.modes.adalora:apply_adalora", ADALORA_OPTIONS,
                       adapter_prefix=(".lora_", ".ranknum")))
register_mode(ModeSpec("sam_dora", "models.modes.lora:apply_dora", LORA_OPTIONS, adapter_prefix=(".lora_",),
                       compared_by_default=False))
register_mode(ModeSpec("sam_full", "models.modes.baselines:apply_full", saves_all=True))
register_mode(ModeSpec("sam_decoder", "models.modes.baselines:apply_decoder_only", trains_encoder=False))
