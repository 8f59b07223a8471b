"""Prompt-only baselines for box prompts: what a box alone gives, without any model.

    python scripts/box_baselines.py -dataset isic -data_path DATA          (test split, else val)

For every image of the split and every class, the tight bounding box of the ground-truth mask is turned
into a mask two ways, at the ORIGINAL image resolution: the filled box, and the ellipse inscribed in
it. Dice and IoU are computed against the original mask with the project's metrics. A model given box
prompts must beat these to have learned anything beyond the box.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402


def box_masks(mask: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """H x W boolean mask -> (filled tight box, inscribed ellipse), both H x W boolean (empty stays empty)."""
    import numpy as np

    filled, ellipse = np.zeros_like(mask), np.zeros_like(mask)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return filled, ellipse
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    filled[y0:y1 + 1, x0:x1 + 1] = True
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    ellipse[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = True
    return filled, ellipse


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    from cfg import parse_args
    from datasets import build_datasets
    from engine.metrics import MetricAccumulator

    config, _ = parse_args("val", list(argv if argv is not None else sys.argv[1:]))
    data = build_datasets(config)
    split, dataset = ("test", data.test) if data.test is not None else ("val", data.val)
    results = {}
    for index, name in enumerate(("box_fill", "box_ellipse")):
        metrics = MetricAccumulator(data.class_names)
        for i in range(len(dataset)):
            truth = dataset.bank.channels(i) > 0.5  # C x H x W at the original resolution
            predicted = torch.stack([torch.from_numpy(box_masks(channel)[index]) for channel in truth])[None]
            logits = torch.where(predicted, 1.0, -1.0)
            valid = torch.ones(1, 1, *truth.shape[1:], dtype=torch.bool)
            metrics.update(logits, torch.from_numpy(truth)[None].float(), valid)
        results[name] = metrics.summary()
        print(f"{name:<12} {split} split, {len(dataset)} images: dice_mean {results[name]['dice_mean']:.4f} "
              f"iou_mean {results[name]['iou_mean']:.4f}")
    return results


if __name__ == "__main__":
    run_cli(main)
