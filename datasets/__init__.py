"""Data sets: DataOptions -> DataBundle of train/val/test torch Datasets yielding sample dicts.

Every sample is a dict (S = options.image_size, C classes, N = n_points + n_neg_points):
  image         float32 3 x S x S, values 0..255; longest side resized to S, zero padding bottom/right
  mask          float32 C x S x S in [0, 1] (binary; soft for refuge -rater_policy mean); 0 in the padding
  valid_hw      int64 (2,): height, width of the un-padded region in the S x S frame
  original_hw   int64 (2,): height, width of the image file (after a training ROI crop: of the file)
  name, image_path  str (synthetic: a virtual path)
  points        float32 C x N x 2 (x, y) and point_labels int64 C x N (1 fg, 0 bg, -1 padding): -prompt click
  boxes         float32 C x 4 (x0, y0, x1, y1, inclusive pixels): -prompt box
Prompts come from the final mask (after augmentation and resizing). Training: random clicks / jittered
boxes. Evaluation: deterministic (interior point first, the rest from an RNG seeded by seed and sample
name). An empty class gets padding clicks (label -1) and the whole valid area as its box. Training
samples whose every class is empty are skipped (with a warning) unless -prompt none.

`build_image_folder(folder, image_size, num_classes, boxes)` gives the unlabelled -images folder for prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.errors import UserError

from . import folder, isic, nifti, refuge, synthetic
from .base import Layout, MaskBank, Record, SegmentationDataset, read_codes
from .images import ImageFolderDataset, build_image_folder
from .options import DataOptions

REGISTRY: dict[str, Callable[[DataOptions], Layout]] = {
    "synthetic": synthetic.detect,
    "folder": folder.detect,
    "isic": isic.detect,
    "refuge": refuge.detect,
}
# data sets that build their own DataBundle (volumes: split by volume, served as slices)
BUNDLE_BUILDERS: dict[str, Callable[[DataOptions, Optional[dict]], "DataBundle"]] = {"nifti": nifti.build_bundle}
SPLIT_NAMES = ("train", "val", "test")

__all__ = ["DataBundle", "DataOptions", "REGISTRY", "build_datasets", "build_image_folder", "ImageFolderDataset",
           "SegmentationDataset"]


@dataclass
class DataBundle:
    train: SegmentationDataset
    val: SegmentationDataset
    test: Optional[SegmentationDataset]
    num_classes: int
    class_names: list[str]
    layout: str  # one sentence naming the detected layout and where validation comes from
    splits: dict  # {"train": [...], "val": [...], "test": [...]} file keys (test absent when there is none)


def holdout(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out of round(fraction x n) records (at least 1) as validation; order kept."""
    records = sorted(records, key=lambda r: r.key)
    if len(records) < 2:
        raise UserError(f"only {len(records)} training image: need at least 2 to hold out a validation split "
                        f"(`val_frac`); add images or a val/ folder")
    count = min(len(records) - 1, max(1, int(round(fraction * len(records)))))
    chosen = set(np.random.default_rng(seed).permutation(len(records))[:count].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


def _reuse(layout: Layout, splits: dict, where: str) -> dict[str, Optional[list[Record]]]:
    pool = {r.key: r for part in (layout.train, layout.val, layout.test) if part for r in part}
    chosen: dict[str, Optional[list[Record]]] = {}
    for split in SPLIT_NAMES:
        keys = splits.get(split)
        if keys is None:
            if split != "test":
                raise UserError(f"the saved splits lack '{split}': use the run's own splits.json")
            chosen[split] = None
            continue
        missing = [k for k in keys if k not in pool]
        if missing:
            raise UserError(f"{where} lacks {missing[0]} ({len(missing)} of the {split} files in the run's saved "
                            f"splits are missing): point `data_path` at the data the run used")
        chosen[split] = [pool[k] for k in keys] if keys else None
    if not chosen["train"] or not chosen["val"]:
        raise UserError("the saved splits have an empty train or val list: use the run's own splits.json")
    return chosen


def _check_options(options: DataOptions) -> None:
    if options.dataset not in REGISTRY and options.dataset not in BUNDLE_BUILDERS:
        known = ", ".join([*REGISTRY, *BUNDLE_BUILDERS])
        raise UserError(f"`dataset` {options.dataset} is unknown; choose one of {known}")
    if options.roi_crop and options.dataset != "refuge":
        raise UserError(f"`roi_crop` crops around the optic disc: it needs `dataset` refuge, not {options.dataset}")
    if options.dataset != "synthetic":
        if not options.data_path:
            raise UserError(f"`dataset` {options.dataset} needs `data_path` DIR")
        if not Path(options.data_path).is_dir():
            raise UserError(f"`data_path` {options.data_path} does not exist or is not a folder: fix the path")


def build_datasets(options: DataOptions, splits: Optional[dict] = None) -> DataBundle:
    """Detect the layout, read and check every mask, and build the three splits.

    `splits` (the `DataBundle.splits` of an earlier build, e.g. from the run folder) pins the files of each
    split. max_train / max_eval keep the first N samples of a split (after skipping empty training masks).
    """
    _check_options(options)
    if options.dataset in BUNDLE_BUILDERS:
        return BUNDLE_BUILDERS[options.dataset](options, splits)
    layout = REGISTRY[options.dataset](options)
    where = "the synthetic set (check `seed`, `synthetic_size`, `synthetic_classes`)" \
        if options.dataset == "synthetic" else f"`data_path` {options.data_path}"
    sentence = layout.description
    if splits is not None:
        parts = _reuse(layout, splits, where)
        sentence += "; splits reused from the run"
    else:
        parts = {"train": layout.train, "val": layout.val, "test": layout.test}
        if parts["val"] is None:
            parts["train"], parts["val"] = holdout(layout.train, options.val_frac, options.seed)
            sentence += f"; validation = {options.val_frac:g} of training held out (seed {options.seed})"
    if parts["test"] is None:
        sentence += "; no test split"
    for note in layout.notes:
        sentence += f"; {note}"

    codec = layout.codec
    codes = {split: read_codes(records, codec) for split, records in parts.items() if records}
    codec.finish(codes, parts)
    built: dict[str, Optional[SegmentationDataset]] = {}
    for split, records in parts.items():
        if not records:
            built[split] = None
            continue
        ds = SegmentationDataset(records, MaskBank(codes[split], codec), options, train=split == "train")
        if split == "train" and options.prompt != "none":
            dropped = ds.drop_empty()
            if dropped:
                print(f"warning: skipped {dropped} of {len(records)} training images with empty masks "
                      f"(no {options.prompt} prompt can be derived); -prompt none keeps them")
            if len(ds) == 0:
                raise UserError(f"every training mask in {where} is empty: check the masks "
                                f"(values, encoding) or train with `prompt` none")
        ds.truncate(options.max_train if split == "train" else options.max_eval)
        built[split] = ds
    saved = {split: [r.key for r in records] for split, records in parts.items() if records}
    return DataBundle(train=built["train"], val=built["val"], test=built["test"], num_classes=codec.num_classes,
                      class_names=list(codec.class_names), layout=sentence, splits=saved)
