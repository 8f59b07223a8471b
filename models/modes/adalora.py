"""sam_adalora: peft AdaLoRA with ONE rank allocator for the whole run.

peft adds AdaLoRA's orthogonal regulariser only for models whose output has a `.loss`; this mode
returns it through `extra_loss`. The budget schedule (initial rank, target rank, warm-up and
final fractions of all steps) comes from the adalora_* options and the run's total step count.
"""
from __future__ import annotations

from typing import Optional

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from torch import Tensor, nn

from .adaptation import Adaptation, freeze_all_but_decoder, take_autocast_inputs_as_given
from .fused_lora import fuse_svd_linears

ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoraAdaptation(Adaptation):
    """Hooks AdaLoRA into the loop: orthogonality loss, rank allocation, resumable allocator state."""

    def __init__(self, tuner: AdaLoraModel, orth_weight: float):
        super().__init__("sam_adalora", tuner)
        self.orth_weight = orth_weight

    @property
    def _config(self) -> AdaLoraConfig:
        return self.tuner.peft_config["default"]

    def extra_loss(self) -> Optional[Tensor]:
        return self.orth_weight * orthogonal_regulariser(self.tuner.model)

    def after_backward(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def total_rank(self) -> int:
        """Ranks kept by the allocator's latest allocation (peft's rank_pattern); before the first
        allocation every rank counts. Counting non-zero lora_E entries instead would report 0 at the
        start (lora_E is zero-initialised) and too much between allocations when -adalora_delta_t > 1."""
        pattern = self._config.rank_pattern
        if pattern:
            return sum(sum(bool(kept) for kept in ranks) for ranks in pattern.values())
        return sum(param.numel() for name, param in self.tuner.model.named_parameters() if "lora_E" in name)

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        state = {key: dict(getattr(allocator, key)) for key in ALLOCATOR_STATE}
        state["rank_pattern"] = self._config.rank_pattern
        return state

    def load_state_dict(self, state: dict) -> None:
        allocator = self.tuner.rankallocator
        for key in ALLOCATOR_STATE:
            setattr(allocator, key, dict(state[key]))
        self._config.rank_pattern = state["rank_pattern"]


def orthogonal_regulariser(encoder: nn.Module) -> Tensor:
    """Mean over AdaLoRA's P (lora_A) and Q (lora_B) of ||P P^T - I||_F and ||Q^T Q - I||_F."""
    terms = []
    for name, param in encoder.named_parameters():
        if not param.requires_grad or ("lora_A" not in name and "lora_B" not in name):
            continue
        gram = param @ param.T if "lora_A" in name else param.T @ param
        identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        terms.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    return torch.stack(terms).mean()


def adalora_schedule(total_steps: int, tinit: float, tfinal: float, delta_t: int) -> dict:
    """Step counts of AdaLoRA's budget schedule from the warm-up and final fractions of all steps."""
    warmup, final = int(tinit * total_steps), int(tfinal * total_steps)
    if total_steps - final <= warmup:
        raise ValueError(f"{total_steps} steps leave no pruning phase; train longer or lower adalora_tinit/tfinal")
    return dict(total_step=total_steps, tinit=warmup, tfinal=final, deltaT=delta_t)


def apply_adalora(segmenter: nn.Module, total_steps: int, *, lora_alpha: Optional[float], lora_dropout: float,
                  adalora_init_r: int, adalora_target_r: int, adalora_tinit: float, adalora_tfinal: float,
                  adalora_delta_t: int, adalora_orth_reg: float, decoder: str) -> Adaptation:
    """AdaLoRA on the encoder's declared linears (peft's AdaLoRA adapts linears only); `decoder`: full | lora
    (plain LoRA of rank adalora_target_r, the encoder's final average rank) | frozen."""
    decoder_tuner = freeze_all_but_decoder(segmenter, decoder, adalora_target_r)
    adalora_config = AdaLoraConfig(init_r=adalora_init_r, target_r=adalora_target_r,
                                   lora_alpha=lora_alpha or adalora_init_r, lora_dropout=lora_dropout,
                                   target_modules=segmenter.adapt_targets.linears,
                                   **adalora_schedule(total_steps, adalora_tinit, adalora_tfinal, adalora_delta_t))
    tuner = fuse_svd_linears(take_autocast_inputs_as_given(AdaLoraModel(segmenter.image_encoder, adalora_config,
                                                                        "default")))
    adaptation = AdaLoraAdaptation(tuner, adalora_orth_reg)
    adaptation.decoder_tuner = decoder_tuner
    return adaptation
