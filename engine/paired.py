"""Paired comparison of two evaluations of the same images: is run A's Dice really above run B's?

Both evaluations record one row per image (`evaluate(..., per_image=...)`: train.py's final_metrics.json and
val.py's -json). Differences are taken image by image, and a bootstrap over images gives a confidence
interval for the mean difference: the spread that the choice of test images alone puts on a comparison.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import UserError


def read_per_image(path: Path) -> list[dict]:
    """The per-image rows of a run folder (its final_metrics.json) or of a val.py -json file."""
    file = path / "final_metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: neither a run folder with final_metrics.json nor a val.py -json file")
    rows = json.loads(file.read_text()).get("per_image")
    if not rows:
        raise UserError(f"{file} has no per-image scores (made before they were recorded): evaluate again with "
                        f"python val.py -weights RUN -json FILE")
    return rows


def image_scores(rows: list[dict], metric: str) -> dict[str, float]:
    """image name -> its `metric` ("dice" or "iou"), averaged over the classes."""
    prefix = f"{metric}_"
    return {row["image"]: float(np.mean([v for k, v in row.items() if k.startswith(prefix)])) for row in rows}


def paired_difference(a_rows: list[dict], b_rows: list[dict], metric: str = "dice", resamples: int = 10000,
                      seed: int = 0) -> dict:
    """Mean of A - B over the shared images, its bootstrap 95% interval, and how often each side wins."""
    a, b = image_scores(a_rows, metric), image_scores(b_rows, metric)
    if a.keys() != b.keys():
        only = sorted(a.keys() - b.keys()) or sorted(b.keys() - a.keys())
        side = "A" if only[0] in a else "B"
        raise UserError(f"the two evaluations cover different images ({len(a)} and {len(b)}; {only[0]} only in "
                        f"{side}): evaluate both on the same split and -max_eval")
    names = sorted(a)
    difference = np.array([a[name] - b[name] for name in names])
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    low, high = np.percentile(difference[draws].mean(axis=1), [2.5, 97.5])
    return {"images": len(names), "mean_a": float(np.mean([a[n] for n in names])),
            "mean_b": float(np.mean([b[n] for n in names])), "difference": float(difference.mean()),
            "ci_low": float(low), "ci_high": float(high), "a_better": int((difference > 0).sum()),
            "b_better": int((difference < 0).sum())}
