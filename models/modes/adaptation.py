"""What every mode returns, and the trainable-parameter bookkeeping shared by the modes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from .lora_layer import LoraTuner


@dataclass
class Adaptation:
    """The result of adapting a segmenter: hooks into the training loop for one mode."""

    mode: str
    tuner: Optional[Any] = None  # the encoder's LoRA-family tuner (lora_layer's LoraTuner / AdaLoraTuner, or
    # peft's LoraModel for DoRA and -lora_conv): `merge_and_unload()` folds it away
    decoder_tuner: Optional[Any] = None  # the mask decoder's LoraTuner (`decoder="lora"`), for merging
    lr_ratios: dict = field(default_factory=dict)  # parameter-name fragment -> its learning rate as a multiple of -lr

    def extra_loss(self) -> Optional[Tensor]:
        """A regulariser added to the task loss (AdaLoRA's orthogonality term), or None."""
        return None

    def after_backward(self, step: int) -> None:
        """Called after backward and the optimizer step, before zero_grad (AdaLoRA's rank allocation)."""

    def total_rank(self) -> Optional[int]:
        """Current total rank of the adapted linears (AdaLoRA), or None when ranks are fixed."""
        return None

    def state_dict(self) -> dict:
        """Mode state needed to resume (AdaLoRA allocator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


DECODER_CHOICES = ("full", "lora", "frozen")
DECODER_LORA_RANK = 4


def freeze_all_but_decoder(segmenter: nn.Module, decoder: str = "full",
                           rank: int = DECODER_LORA_RANK) -> Optional[LoraTuner]:
    """The PEFT setting: everything frozen, then the mask decoder trained fully ("full"), through LoRA of
    rank `rank` on its transformer's attention and MLP linears ("lora", as declared by the decoder's
    `lora_targets`), or not at all ("frozen"). Modes then unfreeze their encoder adapters. Returns the
    decoder's LoraTuner for "lora", else None."""
    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {', '.join(DECODER_CHOICES)}, not {decoder}")
    segmenter.requires_grad_(False)
    if decoder == "full":
        segmenter.mask_decoder.requires_grad_(True)
    if decoder != "lora":
        return None
    return LoraTuner(segmenter.mask_decoder, segmenter.mask_decoder.lora_targets, rank, rank, 0.0)


def take_autocast_inputs_as_given(tuner: nn.Module) -> nn.Module:
    """Let the tuner's peft layers pass an input already cast for autocast (`saved_tensors.cast_for_matmul`)
    to their branch as it is. peft would cast it back up to the adapter's float32, autocast then down again,
    and the branch would save that second copy for backward instead of sharing the one the recipe covers."""
    for module in tuner.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return tuner


PARTS = ("encoder adapters", "encoder base", "decoder adapters", "mask decoder", "other")


def parameter_parts(segmenter: nn.Module, adapter_prefix: tuple[str, ...]):
    """(part, name, parameter) for every parameter: encoder adapters (names holding one of the mode's
    `adapter_prefix` fragments), encoder base, decoder adapters (`decoder="lora"`), mask decoder, other."""
    for name, param in segmenter.named_parameters():
        if name.startswith("image_encoder."):
            part = "encoder adapters" if any(p in name for p in adapter_prefix) else "encoder base"
        elif name.startswith("mask_decoder."):
            part = "decoder adapters" if ".lora_" in name else "mask decoder"
        else:
            part = "other"
        yield part, name, param


def parameter_table(segmenter: nn.Module, adapter_prefix: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(part, trainable, total) rows: the parts of `parameter_parts`, then all."""
    rows = {part: [0, 0] for part in PARTS}
    for part, _, param in parameter_parts(segmenter, adapter_prefix):
        rows[part][0] += param.numel() if param.requires_grad else 0
        rows[part][1] += param.numel()
    table = [(part, trainable, total) for part, (trainable, total) in rows.items()]
    table.append(("all", sum(r[1] for r in table), sum(r[2] for r in table)))
    return table



# Trainable parameters that a training step may leave out of the autograd graph (no gradient at all):
# - the mask decoder's IoU head: the predicted IoU never reaches the loss;
# - the prompt encoder: which of its embeddings a step reads depends on the prompt kind (clicks leave the
#   box-corner embeddings out, boxes the click ones), and SAM's mask_downscaling is never read (no mask prompts);
# - TinyViT's ImageNet classifier (`norm_head`, `head`), which exists only for strict loading.
# The decoder's tokens and every hypernetwork MLP stay in the graph (all masks are computed, then sliced),
# and adapter/LoRA tensors always reach the loss. Only sam_full trains the last two groups.
NO_GRADIENT = re.compile(r"mask_decoder\.iou_prediction_head\..*|prompt_encoder\..*|image_encoder\.(norm_head|head)\..*")


def trainable_without_gradient(segmenter: nn.Module) -> list[str]:
    """The trainable parameters that may get no gradient in a step; DDP needs `find_unused_parameters`
    (an extra graph traversal every step) exactly when this is not empty."""
    return [name for name, param in segmenter.named_parameters() if param.requires_grad and NO_GRADIENT.fullmatch(name)]
