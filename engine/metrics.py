"""Segmentation metrics: per-class Dice and IoU at threshold 0.5, averaged per image then over the set.

Predictions are sigmoid(logits) > 0.5 (hard masks, never averaged over thresholds); targets are
binarised at 0.5 (soft multi-rater targets included). Only the un-padded region counts. An image
whose class is empty in both target and prediction scores Dice = IoU = 1 for that class; empty
target with a non-empty prediction (or the reverse) scores 0.

vCDR (disc + cup): the mean absolute error of the vertical cup-to-disc ratio over the images whose
ground truth has a disc. An image whose predicted disc is empty (the model failed; its ratio is
undefined) is not left out: it counts with the largest possible error for a ratio in [0, 1],
max(truth, 1 - truth), and `vcdr_failed` reports how many such images there were.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.preprocess import valid_area


def valid_region(valid_hw: Tensor, size: int, frame: int) -> Tensor:
    """B x 1 x size x size boolean mask of the un-padded area; valid_hw is given in a frame x frame image."""
    scaled = torch.round(valid_hw.float() * size / frame).long()
    return valid_area(scaled, size, size, device=valid_hw.device)


def dice_iou_per_image(logits: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """B x C x H x W logits and targets, B x 1 x H x W valid area -> (B x C Dice, B x C IoU)."""
    pred = (logits > 0) & valid
    truth = (target > 0.5) & valid
    inter = (pred & truth).sum(dim=(2, 3)).float()
    pred_sum, truth_sum = pred.sum(dim=(2, 3)).float(), truth.sum(dim=(2, 3)).float()
    union = pred_sum + truth_sum - inter
    both_empty = union == 0
    dice = torch.where(both_empty, torch.ones_like(inter), 2 * inter / (pred_sum + truth_sum).clamp(min=1))
    iou = torch.where(both_empty, torch.ones_like(inter), inter / union.clamp(min=1))
    return dice, iou


def vertical_extent(masks: Tensor) -> Tensor:
    """B x H x W boolean -> B number of rows between the first and last row holding the class."""
    rows = masks.any(dim=2)
    index = torch.arange(rows.shape[1], device=masks.device)
    first = torch.where(rows, index, rows.shape[1]).amin(dim=1)
    last = torch.where(rows, index, -1).amax(dim=1)
    return (last - first + 1).clamp(min=0).float()


def vertical_cdr(disc: Tensor, cup: Tensor) -> Tensor:
    """Vertical cup-to-disc ratio per image (NaN where the disc is empty)."""
    disc_h = vertical_extent(disc)
    return torch.where(disc_h > 0, vertical_extent(cup) / disc_h.clamp(min=1), torch.nan)


@dataclass
class MetricAccumulator:
    """Sums per-image scores; `summary()` gives per-class and mean Dice/IoU (and vCDR error for disc+cup)."""

    class_names: list[str]
    sums: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Start from zeros, so a process that sees no image (fewer evaluation images than processes)
        # still has a state tensor of the same length to sum over processes.
        classes = len(self.class_names)
        zeros = {"dice": torch.zeros(classes), "iou": torch.zeros(classes), "count": torch.tensor(0.0)}
        if self.class_names == ["disc", "cup"]:
            zeros.update(cdr_error=torch.tensor(0.0), cdr_count=torch.tensor(0.0), cdr_failed=torch.tensor(0.0))
        for key, value in zeros.items():
            self.sums.setdefault(key, value.double())

    def update(self, logits: Tensor, target: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Adds a batch; returns its per-image Dice and IoU (B x C)."""
        dice, iou = dice_iou_per_image(logits, target, valid)
        batch = {"dice": dice.sum(0), "iou": iou.sum(0), "count": torch.tensor(float(dice.shape[0]))}
        if self.class_names == ["disc", "cup"]:
            pred, truth = (logits > 0) & valid, (target > 0.5) & valid
            true_cdr, pred_cdr = vertical_cdr(truth[:, 0], truth[:, 1]), vertical_cdr(pred[:, 0], pred[:, 1])
            scored = ~true_cdr.isnan()  # the ground truth has a disc
            failed = scored & pred_cdr.isnan()  # ... but the prediction has none: the largest possible error
            error = torch.where(failed, torch.maximum(true_cdr, 1 - true_cdr), (pred_cdr - true_cdr).abs())
            batch["cdr_error"] = error[scored].sum()
            batch["cdr_count"] = scored.sum().float()
            batch["cdr_failed"] = failed.sum().float()
        for key, value in batch.items():
            value = value.detach().double().cpu()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        return dice, iou

    def summary(self) -> dict[str, float]:
        count = float(self.sums["count"])
        result = {}
        for metric in ("dice", "iou"):
            per_class = self.sums[metric] / count
            for name, value in zip(self.class_names, per_class.tolist()):
                result[f"{metric}_{name}"] = value
            result[f"{metric}_mean"] = float(per_class.mean())
        if "cdr_count" in self.sums and float(self.sums["cdr_count"]) > 0:
            result["vcdr_mae"] = float(self.sums["cdr_error"] / self.sums["cdr_count"])
            result["vcdr_failed"] = float(self.sums["cdr_failed"])
        result["images"] = count
        return result

    def state_tensor(self) -> Tensor:
        """All sums as one flat tensor, for summing over processes."""
        return torch.cat([self.sums[k].reshape(-1) for k in sorted(self.sums)])

    def load_state_tensor(self, flat: Tensor) -> None:
        offset = 0
        for key in sorted(self.sums):
            size = self.sums[key].numel()
            self.sums[key] = flat[offset:offset + size].reshape(self.sums[key].shape)
            offset += size
