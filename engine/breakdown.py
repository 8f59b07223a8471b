"""Where a run loses: per-image scores grouped by how much of the image the object covers.

A boundary error costs a small lesion more Dice than a large one, and one click on a small lesion says
less about its extent. Grouping the per-image rows of evaluations (`evaluate(..., per_image=...)`) by the
foreground fraction of each image's mask, in equal-count groups over the evaluated images, shows whether a
run's deficit is spread evenly or sits in one size range.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import UserError

from .paired import image_scores


def evaluated_config(path: Path) -> dict:
    """The settings an evaluation ran with: a run folder's config.json, or the config a val.py -json file holds."""
    file = path / "config.json" if path.is_dir() else path
    config = json.loads(file.read_text()) if file.is_file() else None
    if path.is_file():
        config = (config or {}).get("config")
    if not config:
        raise UserError(f"{path}: no settings found (a run folder with config.json or a val.py -json file)")
    return config


def foreground_fractions(dataset) -> dict[str, float]:
    """Image name -> the fraction of its pixels inside any class, at the original resolution."""
    return {name: float((dataset.bank.channels(index) > 0.5).any(axis=0).mean())
            for index, name in enumerate(dataset.names)}


def by_foreground(runs: dict[str, list[dict]], fractions: dict[str, float], groups: int = 4,
                  metric: str = "dice") -> dict:
    """Mean `metric` of each run per foreground-fraction group (equal counts, smallest objects first), the
    groups' fraction ranges, and how many images each run scores below 0.5."""
    scores = {label: image_scores(rows, metric) for label, rows in runs.items()}
    names = sorted(next(iter(scores.values())))
    for label, per_image in scores.items():
        if sorted(per_image) != names:
            raise UserError(f"{label} was evaluated on other images than the first evaluation: use the same split "
                            f"and -max_eval for all")
    missing = [name for name in names if name not in fractions]
    if missing:
        raise UserError(f"image {missing[0]} is not in the evaluated split of this dataset: check -data_path")
    if not 1 <= groups <= len(names):
        raise UserError(f"-groups {groups}: use 1 to {len(names)} (the number of evaluated images)")
    ordered = sorted(names, key=lambda name: (fractions[name], name))
    split = np.array_split(np.array(ordered), groups)
    return {"ranges": [(fractions[group[0]], fractions[group[-1]]) for group in split],
            "sizes": [len(group) for group in split],
            "means": {label: [float(np.mean([per_image[n] for n in group])) for group in split]
                      for label, per_image in scores.items()},
            "overall": {label: float(np.mean(list(per_image.values()))) for label, per_image in scores.items()},
            "below_half": {label: sum(value < 0.5 for value in per_image.values())
                           for label, per_image in scores.items()}}
