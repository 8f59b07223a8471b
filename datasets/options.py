"""The values the data sets use, and nothing else of the run's configuration."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataOptions:
    """What building the splits and their samples needs (see datasets/__init__.py for the sample keys).

    dataset / data_path: the registered dataset name and its root folder (None for synthetic);
    image_size: S of the S x S samples; prompt: click | box | none, with n_points positive and
    n_neg_points negative clicks per class; aug: none | light | strong (training only);
    val_frac: held-out validation fraction when the layout has none; roi_crop: refuge optic-disc crop
    in training; rater_policy: refuge multi-rater masks; synthetic_size / synthetic_classes: the
    generated set; cache_images: keep resized images in memory; max_train / max_eval: keep only the
    first N samples; seed: every random choice of the data (hold-out, prompts, augmentation);
    slice_axis / window / labels: NIfTI volumes (slicing axis after RAS reorientation, CT window "L,W",
    label values in class order).
    """

    dataset: str
    data_path: Optional[str]
    image_size: int
    prompt: str
    n_points: int
    n_neg_points: int
    aug: str
    val_frac: float
    roi_crop: bool
    rater_policy: str
    synthetic_size: int
    synthetic_classes: int
    cache_images: bool
    max_train: Optional[int]
    max_eval: Optional[int]
    seed: int
    slice_axis: int = 2
    window: Optional[str] = None
    labels: Optional[str] = None

    @classmethod
    def pick(cls, source) -> "DataOptions":
        """The attributes of the same names from any object (the run's Config)."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})
