"""sam_adalora: AdaLoRA layers (lora_layer.AdaLoraLinear, peft's layout) with ONE rank budget (`RankBudget`)
for the whole run.

peft adds AdaLoRA's orthogonal regulariser only for models whose output has a `.loss`; this mode
returns it through `extra_loss`. The budget schedule (initial rank, target rank, warm-up and
final fractions of all steps) comes from the adalora_* options and the run's total step count.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .adaptation import Adaptation, freeze_all_but_decoder
from .lora_layer import AdaLoraSchedule, AdaLoraTuner
from .rank_budget import RankBudget


class AdaLoraAdaptation(Adaptation):
    """Hooks AdaLoRA into the loop: orthogonality loss, rank allocation, resumable allocator state."""

    def __init__(self, tuner: AdaLoraTuner):
        super().__init__("sam_adalora", tuner)
        self.budget = RankBudget(tuner.model, tuner.schedule)

    def extra_loss(self) -> Optional[Tensor]:
        return self.tuner.schedule.orth_reg_weight * orthogonal_regulariser(self.budget.params[0::3], self.budget.params[2::3])

    def after_backward(self, step: int) -> None:
        self.budget.step(step)
        self.tuner.rank_pattern = self.budget.rank_pattern

    def total_rank(self) -> int:
        """Ranks kept by the allocator's latest allocation (the rank pattern); before the first
        allocation every rank counts. Counting non-zero lora_E entries instead would report 0 at the
        start (lora_E is zero-initialised) and too much between allocations when -adalora_delta_t > 1."""
        pattern = self.tuner.rank_pattern
        if pattern:
            return sum(sum(bool(kept) for kept in ranks) for ranks in pattern.values())
        return sum(param.numel() for name, param in self.tuner.model.named_parameters() if "lora_E" in name)

    def state_dict(self) -> dict:
        return self.budget.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.budget.load_state_dict(state)
        self.tuner.rank_pattern = self.budget.rank_pattern


def orthogonal_regulariser(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """Mean over AdaLoRA's P (`left`, lora_A, r x in) and Q (`right`, lora_B, out x r) of ||P P^T - I||_F and
    ||Q^T Q - I||_F; matrices of one shape go through one batched matmul."""
    grams = [stacked @ stacked.transpose(1, 2) for stacked in stacked_by_shape(left)]
    grams += [stacked.transpose(1, 2) @ stacked for stacked in stacked_by_shape(right)]
    norms = [torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype),
                                      ord="fro") for gram in grams]
    return torch.cat(norms).mean()


def stacked_by_shape(matrices: Sequence[Tensor]) -> list[Tensor]:
    """`matrices` stacked into one n x rows x cols tensor per distinct shape."""
    groups: dict[torch.Size, list[Tensor]] = {}
    for matrix in matrices:
        groups.setdefault(matrix.shape, []).append(matrix)
    return [torch.stack(group) for group in groups.values()]


def adalora_schedule(total_steps: int, tinit: float, tfinal: float, delta_t: int) -> dict:
    """Step counts of AdaLoRA's budget schedule from the warm-up and final fractions of all steps."""
    warmup, final = int(tinit * total_steps), int(tfinal * total_steps)
    if total_steps - final <= warmup:
        raise ValueError(f"{total_steps} steps leave no pruning phase; train longer or lower adalora_tinit/tfinal")
    return dict(total_step=total_steps, tinit=warmup, tfinal=final, deltaT=delta_t)


def apply_adalora(segmenter: nn.Module, total_steps: int, *, lora_alpha: Optional[float], lora_dropout: float,
                  adalora_init_r: int, adalora_target_r: int, adalora_tinit: float, adalora_tfinal: float,
                  adalora_delta_t: int, adalora_orth_reg: float, adalora_init: str, adalora_e_lr_ratio: float,
                  decoder: str) -> Adaptation:
    """AdaLoRA on the encoder's declared linears (AdaLoRA adapts linears only); `decoder`: full | lora
    (plain LoRA of rank adalora_target_r, the encoder's final average rank) | frozen; `adalora_init`:
    gaussian (peft's) | orthogonal (see `orthonormal_singular_vectors`); `adalora_e_lr_ratio`: the singular
    values' (lora_E) learning rate as a multiple of the run's (1: peft's single rate). Adam moves each
    parameter by about the learning rate per step, so the r singular values of a layer move its update
    Q diag(E) P far less per step than LoRA's out x r entries of B move B A."""
    decoder_tuner = freeze_all_but_decoder(segmenter, decoder, adalora_target_r)
    schedule = AdaLoraSchedule(init_r=adalora_init_r, target_r=adalora_target_r, orth_reg_weight=adalora_orth_reg,
                               **adalora_schedule(total_steps, adalora_tinit, adalora_tfinal, adalora_delta_t))
    tuner = AdaLoraTuner(segmenter.image_encoder, segmenter.adapt_targets.linears, lora_alpha or adalora_init_r,
                         lora_dropout, schedule)
    if adalora_init == "orthogonal":
        orthonormal_singular_vectors(tuner)
    adaptation = AdaLoraAdaptation(tuner)
    adaptation.decoder_tuner = decoder_tuner
    adaptation.lr_ratios = {"lora_E": adalora_e_lr_ratio}
    return adaptation


@torch.no_grad()
def orthonormal_singular_vectors(tuner: AdaLoraTuner) -> None:
    """Every layer's P (lora_A, r x in) with orthonormal rows and Q (lora_B, out x r) with orthonormal columns.

    peft draws their entries from N(0, 0.02): its rows and columns have norms of 0.02 sqrt(width), so the update
    Q diag(E) P is several times smaller than the singular values E (4-11x on LiteMedSAM's linears), which
    start at zero and grow by about the learning rate per step. Orthonormal P and Q make E the update's
    singular values from the first step and satisfy the orthogonal regulariser from the start. The update
    is still zero at the start (E = 0)."""
    for name, param in tuner.model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            torch.nn.init.orthogonal_(param)
