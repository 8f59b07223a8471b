"""AdaLoRA's rank budget (Zhang et al., ICLR 2023), with one fused update per step for all adapted linears.

Every step before the final phase, each entry w of every P (lora_A), Lambda (lora_E) and Q (lora_B) gets
a sensitivity |w * dL/dw|, smoothed (beta1) and paired with its uncertainty (beta2); a singular value's
importance is its own score plus the mean score of its row of P and its column of Q. The budget, the
number of singular values kept over all layers, falls from init_r to target_r per layer on a cubic
schedule between the warm-up and the final phase; the least important ones are zeroed. In the final
phase the last allocation is held.

This follows peft's RankAllocator step for step (same schedule, scores, ties and state keys), but it
keeps its parameter lists instead of walking every parameter name several times per step, and updates
the scores with foreach kernels: on MobileSAM that bookkeeping cost more than the adapters' arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .lora_layer import AdaLoraSchedule

SCORE_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's names: sensitivity, smoothed, uncertainty


class RankBudget:
    """Importance scores and singular-value masks for the AdaLoRA layers of `encoder`."""

    def __init__(self, encoder: nn.Module, config: AdaLoraSchedule, adapter: str = "default"):
        named = dict(encoder.named_parameters())
        self.layer_names = sorted(n for n in named if f".lora_E.{adapter}" in n)
        if not self.layer_names:
            raise ValueError("no AdaLoRA layers (lora_E parameters) to allocate ranks to")
        self.names = [name.replace("lora_E", part) for name in self.layer_names for part in ("lora_A", "lora_E", "lora_B")]
        self.params = [named[name] for name in self.names]
        self.values = self.params[1::3]  # the singular values Lambda, one r x 1 column per layer
        self.init_budget = sum(e.shape[0] for e in self.values)
        self.target_budget = config.target_r * len(self.values)
        self.config = config
        self.scores: dict[str, list[Tensor]] = {}
        self.rank_pattern: Optional[dict[str, list[bool]]] = None
        self._masks: Optional[list[Tensor]] = None  # the rank pattern as r x 1 multipliers

    @property
    def final_phase_start(self) -> int:
        return self.config.total_step - self.config.tfinal

    def budget(self, step: int) -> tuple[int, bool]:
        """(ranks kept over all layers, whether to mask at `step`) on the cubic schedule."""
        config = self.config
        if step <= config.tinit:
            return self.init_budget, False
        remaining = 1 - (step - config.tinit) / (self.final_phase_start - config.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % config.deltaT == 0

    def step(self, step: int) -> None:
        """After backward (gradients present) and the optimizer step of global step `step` (1-based)."""
        if step < self.final_phase_start:
            self.update_scores()
            budget, due = self.budget(step)
            if due:
                self.mask_to(budget)
        elif step == self.final_phase_start:
            self.mask_to(self.target_budget)
            self.scores = {}
        elif self.rank_pattern is not None:
            self.hold_pattern()

    @torch.no_grad()
    def update_scores(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not self.scores:
            self.scores = {key: [torch.zeros_like(p) for p in self.params] for key in SCORE_STATE}
        sensitivity = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(sensitivity)
        smoothed, uncertainty = self.scores["exp_avg_ipt"], self.scores["exp_avg_unc"]
        torch._foreach_lerp_(smoothed, sensitivity, 1 - self.config.beta1)
        deviation = torch._foreach_sub(sensitivity, smoothed)
        torch._foreach_abs_(deviation)
        torch._foreach_lerp_(uncertainty, deviation, 1 - self.config.beta2)
        self.scores["ipt"] = sensitivity

    def importance(self) -> list[Tensor]:
        """Per layer, an r-vector: the score of each singular value plus the mean of its P row and Q column."""
        element = torch._foreach_mul(self.scores["exp_avg_ipt"], self.scores["exp_avg_unc"])
        return [e.view(-1) + a.mean(dim=1) + b.mean(dim=0)
                for a, e, b in zip(element[0::3], element[1::3], element[2::3])]

    @torch.no_grad()
    def mask_to(self, budget: int) -> None:
        """Zero all but the `budget` most important singular values (ties at the threshold are zeroed too)."""
        if not self.scores:
            raise RuntimeError("AdaLoRA ranks cannot be allocated before any importance scores were gathered")
        importance = self.importance()
        pruned = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(importance), pruned).values if pruned > 0 else None
        keep = [torch.ones_like(i, dtype=torch.bool) if threshold is None else i > threshold for i in importance]
        kept = torch.cat(keep).tolist()  # one device sync for all layers
        self.rank_pattern, start = {}, 0
        for name, mask in zip(self.layer_names, keep):
            self.rank_pattern[name] = kept[start:start + mask.numel()]
            start += mask.numel()
        self._masks = [mask.view(-1, 1).to(e.dtype) for mask, e in zip(keep, self.values)]
        torch._foreach_mul_(self.values, self._masks)

    @torch.no_grad()
    def hold_pattern(self) -> None:
        """Final phase: the singular values pruned by the last allocation stay zero."""
        if self._masks is None:
            self._masks = [torch.tensor(self.rank_pattern[name], dtype=e.dtype, device=e.device).view(-1, 1)
                           for name, e in zip(self.layer_names, self.values)]
        torch._foreach_mul_(self.values, self._masks)

    def state_dict(self) -> dict:
        """Scores by parameter name (peft's keys) and the latest allocation."""
        state = {key: dict(zip(self.names, self.scores.get(key, []))) for key in SCORE_STATE}
        state["rank_pattern"] = self.rank_pattern
        return state

    def load_state_dict(self, state: dict) -> None:
        stored = [state[key] for key in SCORE_STATE]
        if any(stored):
            self.scores = {key: [state[key][name].to(p.device) for name, p in zip(self.names, self.params)]
                           for key in SCORE_STATE}
        else:
            self.scores = {}
        self.rank_pattern, self._masks = state["rank_pattern"], None
