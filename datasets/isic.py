"""`-dataset isic`: skin-lesion segmentation (one class), in any of four layouts, detected in this order.

- ISBI 2016 Part 1: ISBI2016_ISIC_Part1_{Training,Test}_GroundTruth.csv (image and mask paths relative to
  data_path), or without the CSVs the ISBI2016_ISIC_Part1_{Training,Test}_Data/ and
  ..._{Training,Test}_GroundTruth/ folders paired by name. No validation split: held out from training.
- ISIC 2017 Task 1: ISIC-2017_{Training,Validation,Test_v2}_Data/ with
  ISIC-2017_{...}_Part1_GroundTruth/ISIC_xxxxxxx_segmentation.png (superpixel maps are ignored).
- ISIC 2018 Task 1: ISIC2018_Task1-2_{Training,Validation,Test}_Input/ with
  ISIC2018_Task1_{...}_GroundTruth/ISIC_xxxxxxx_segmentation.png.
- split folders with listings: train.csv, val.csv, test.csv (header image,mask; paths relative to data_path).
Masks are binarised (> 127; 0/1 masks are accepted too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from common.errors import UserError

from .base import Layout, NestedCodec, Record
from .options import DataOptions
from .folder import pairs_to_records
from .io import binary_mask, list_images, pair_by_stem, read_mask, read_pair_csv

TRIED = ("ISBI 2016 (ISBI2016_ISIC_Part1_Training_GroundTruth.csv or ISBI2016_ISIC_Part1_Training_Data/), "
         "ISIC 2017 (ISIC-2017_Training_Data/ + ISIC-2017_Training_Part1_GroundTruth/), "
         "ISIC 2018 (ISIC2018_Task1-2_Training_Input/ + ISIC2018_Task1_Training_GroundTruth/), "
         "split listings (train.csv with columns image,mask)")


class BinaryCodec(NestedCodec):
    def __init__(self, name: str = "lesion"):
        super().__init__([name])

    def read(self, record: Record) -> np.ndarray:
        return binary_mask(read_mask(record.mask_paths[0]), record.mask_paths[0])


def _folder_pair(root: Path, images: str, masks: str, required: bool) -> Optional[list[Record]]:
    image_dir, mask_dir = root / images, root / masks
    if not image_dir.is_dir():
        return None
    if not mask_dir.is_dir():
        if not required:
            return None  # e.g. a test set released without ground truth
        raise UserError(f"{image_dir} has no ground-truth folder: expected {mask_dir}")
    image_files = list_images(image_dir)
    if not image_files:
        raise UserError(f"{image_dir} holds no images (.jpg/.png): fix `data_path` or restore the images")
    return pairs_to_records(pair_by_stem(image_files, list_images(mask_dir), str(image_dir), str(mask_dir)), root)


def _csv(root: Path, name: str) -> Optional[list[Record]]:
    path = root / name
    return pairs_to_records(read_pair_csv(path, root), root) if path.is_file() else None


def _isbi2016(root: Path) -> Optional[Layout]:
    prefix = "ISBI2016_ISIC_Part1_"
    if (root / f"{prefix}Training_GroundTruth.csv").is_file():
        train = _csv(root, f"{prefix}Training_GroundTruth.csv")
        test = _csv(root, f"{prefix}Test_GroundTruth.csv")
        how = f"listings {prefix}{{Training,Test}}_GroundTruth.csv"
    elif (root / f"{prefix}Training_Data").is_dir():
        train = _folder_pair(root, f"{prefix}Training_Data", f"{prefix}Training_GroundTruth", True)
        test = _folder_pair(root, f"{prefix}Test_Data", f"{prefix}Test_GroundTruth", False)
        how = f"folders {prefix}{{Training,Test}}_Data/ + _GroundTruth/"
    else:
        return None
    return Layout(f"ISBI 2016 ISIC Part 1 ({how}) in {root}", BinaryCodec(), train, None, test)


# ISIC challenge releases: (name, marker folder, image folder, mask folder, split tags, description);
# the folders are patterns over the split tag
ISIC_RELEASES = (
    ("ISIC 2017 Task 1", "ISIC-2017_Training_Data", "ISIC-2017_{}_Data", "ISIC-2017_{}_Part1_GroundTruth",
     ("Training", "Validation", "Test_v2"), "ISIC-2017_{Training,Validation,Test_v2}_Data/ + _Part1_GroundTruth/"),
    ("ISIC 2018 Task 1", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1-2_{}_Input",
     "ISIC2018_Task1_{}_GroundTruth", ("Training", "Validation", "Test"),
     "ISIC2018_Task1-2_{Training,Validation,Test}_Input/ + ISIC2018_Task1_*_GroundTruth/"),
)


def _isic_release(root: Path) -> Optional[Layout]:
    for name, marker, images, masks, tags, folders in ISIC_RELEASES:
        if not (root / marker).is_dir():
            continue
        parts = {split: _folder_pair(root, images.format(tag), masks.format(tag), split == "train")
                 for split, tag in zip(("train", "val", "test"), tags)}
        return Layout(f"{name} ({folders}) in {root}", BinaryCodec(), **parts)
    return None


def _split_csvs(root: Path) -> Optional[Layout]:
    if not (root / "train.csv").is_file():
        return None
    parts = {"train": _csv(root, "train.csv"), "val": _csv(root, "val.csv"), "test": _csv(root, "test.csv")}
    listed = "/".join(f"{s}.csv" for s, v in parts.items() if v is not None)
    return Layout(f"split folders with listings {listed} (columns image,mask) in {root}", BinaryCodec(), **parts)


def detect(options: DataOptions) -> Layout:
    root = Path(options.data_path)
    for finder in (_isbi2016, _isic_release, _split_csvs):
        layout = finder(root)
        if layout is not None:
            return layout
    hint = " (it has images/ folders: try `dataset` folder)" if any(root.glob("*/images")) or \
        (root / "images").is_dir() else ""
    raise UserError(f"`data_path` {root} holds no ISIC layout{hint}; tried {TRIED}")
