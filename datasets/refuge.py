"""`-dataset refuge`: optic disc and cup, two classes: disc (including the cup) and cup.

Layouts, detected in this order:
- REFUGE challenge: Training400/{Glaucoma,Non-Glaucoma}/*.jpg with
  Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/*.bmp; Validation400/ with
  REFUGE-Validation400-GT/Disc_Cup_Masks/; Test400/ with its ground truth where present
  (REFUGE-Test-GT/, REFUGE-Test400-GT/ or Annotation-Test400/). The official release's names
  REFUGE-Validation400/ (+ REFUGE-Validation400-GT/) and REFUGE-Test400/ are found too.
- Medical-SAM-Adapter's multi-rater form: Training-400/<name>/<name>.jpg with <name>_seg_cup_{1..7}.png and
  <name>_seg_disc_{1..7}.png (and Test-400/); -rater_policy majority (more than half of the raters),
  mean (soft targets: the fraction of raters) or N (rater N only). No validation split: held out.
- folders: images/ + masks/ (flat, validation held out, no test) or {train,val,test}/{images,masks}.
Single masks follow the REFUGE convention 0 cup, 128 rim, 255 background: disc = mask < 255, cup = mask == 0
(thresholds at 192 and 64, so lossy copies work too); rater masks are binary 0/255 (or 0/1).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from common.errors import UserError

from .base import Layout, MaskCodec, NestedCodec, Record
from .options import DataOptions
from .folder import find_split_folders, pairs_to_records
from .io import binary_mask, list_images, pair_by_stem, read_mask, relative_key

CLASS_NAMES = ["disc", "cup"]
TRIED = ("REFUGE challenge (Training400/ + Annotation-Training400/Disc_Cup_Masks/), "
         "Medical-SAM-Adapter multi-rater (Training-400/<name>/<name>_seg_cup_1.png), "
         "folders (images/ + masks/, or train/images + train/masks)")
TEST_GT = ("REFUGE-Test-GT", "REFUGE-Test400-GT", "Annotation-Test400", "Test400-GT")


class RefugeCodec(NestedCodec):
    """REFUGE grey levels -> code 0 background, 1 rim, 2 cup; channels: disc = code >= 1, cup = code == 2."""

    def __init__(self):
        super().__init__(CLASS_NAMES)

    def read(self, record: Record) -> np.ndarray:
        path = record.mask_paths[0]
        arr = read_mask(path)
        exact = np.isin(arr, (0, 128, 255))
        if np.count_nonzero(~exact) > 0.01 * arr.size or int(arr.max()) < 192:
            values = np.unique(arr)
            shown = ", ".join(str(v) for v in values[:6]) + (" ..." if values.size > 6 else "")
            raise UserError(f"mask {path} has values {{{shown}}} that fit no REFUGE encoding: expected 0 cup, "
                            f"128 rim, 255 background (convert label masks to these grey levels)")
        return ((arr < 192).astype(np.uint8) + (arr < 64).astype(np.uint8))


class RaterCodec(MaskCodec):
    """Multi-rater masks -> code (disc count, cup count, rater-count plane); channels by rater policy."""

    def __init__(self, policy: str):
        self.class_names = list(CLASS_NAMES)
        self.policy = policy
        self.soft = policy == "mean"

    def read(self, record: Record) -> np.ndarray:
        raters = _raters(record)
        chosen = sorted(raters) if not self.policy.isdigit() else [int(self.policy)]
        if chosen[0] not in raters:
            raise UserError(f"`rater_policy` {self.policy}: {record.image_path} has masks of raters "
                            f"{','.join(map(str, sorted(raters)))} only; pick one of those or majority/mean")
        counts, shape = None, None
        for rater in chosen:
            disc_path, cup_path = raters[rater]
            disc, cup = (binary_mask(read_mask(p), p) for p in (disc_path, cup_path))
            for path, arr in ((disc_path, disc), (cup_path, cup)):
                if shape is not None and arr.shape != shape:
                    raise UserError(f"rater mask {path} is {arr.shape[1]}x{arr.shape[0]} but {disc_path.parent}'s "
                                    f"other masks are {shape[1]}x{shape[0]}: all masks must match the image")
                shape = arr.shape
            disc = np.maximum(disc, cup)  # the disc includes the cup
            counts = np.stack([disc, cup]) if counts is None else counts + np.stack([disc, cup])
        plane = np.full((1, *shape), len(chosen), np.uint8)
        return np.concatenate([counts.astype(np.uint8), plane])

    def channels(self, code: np.ndarray) -> np.ndarray:
        counts, n = code[:2].astype(np.float32), code[2:3].astype(np.float32)
        if self.policy == "majority":
            return (2 * counts > n).astype(np.float32)
        return counts / n


_RATER = re.compile(r"^(?P<name>.+)_seg_(?P<part>cup|disc)_(?P<rater>\d+)$", re.IGNORECASE)


def _raters(record: Record) -> dict[int, tuple[Path, Path]]:
    found: dict[str, dict[int, Path]] = {"disc": {}, "cup": {}}
    for path in record.mask_paths:
        match = _RATER.match(path.stem)
        found[match["part"].lower()][int(match["rater"])] = path
    for part, other in (("disc", "cup"), ("cup", "disc")):
        for rater in found[part]:
            if rater not in found[other]:
                raise UserError(f"{found[part][rater]} has no matching {other} mask of rater {rater} "
                                f"({record.name}_seg_{other}_{rater}.png): add it or remove the {part} mask")
    return {r: (found["disc"][r], found["cup"][r]) for r in found["disc"]}


def _recursive_pairs(root: Path, image_dir: Path, mask_dir: Path) -> list[Record]:
    images = list_images(image_dir, recursive=True)
    if not images:
        raise UserError(f"{image_dir} holds no images (.jpg/.png): fix `data_path` or restore the images")
    return pairs_to_records(pair_by_stem(images, list_images(mask_dir, recursive=True), str(image_dir),
                                         str(mask_dir)), root)


def _gt_dir(root: Path, names) -> Optional[Path]:
    for name in names:
        if (root / name).is_dir():
            inner = root / name / "Disc_Cup_Masks"
            return inner if inner.is_dir() else root / name
    return None


# image folders of each split: the challenge's short names and the official release's REFUGE- names
SPLIT_IMAGES = {"train": ("Training400", "REFUGE-Training400"), "val": ("Validation400", "REFUGE-Validation400"),
                "test": ("Test400", "REFUGE-Test400")}


def _first_dir(root: Path, names) -> Optional[Path]:
    return next((root / name for name in names if (root / name).is_dir()), None)


def _challenge(root: Path) -> Optional[Layout]:
    train_dir = _first_dir(root, SPLIT_IMAGES["train"])
    if train_dir is None:
        return None
    train_gt = _gt_dir(root, ("Annotation-Training400", "REFUGE-Training400-GT"))
    if train_gt is None:
        raise UserError(f"{train_dir} has no masks: expected "
                        f"{root / 'Annotation-Training400' / 'Disc_Cup_Masks'}")
    train = _recursive_pairs(root, train_dir, train_gt)
    val = test = None
    notes = []
    val_dir = _first_dir(root, SPLIT_IMAGES["val"])
    if val_dir is not None:
        gt = _gt_dir(root, ("REFUGE-Validation400-GT", "Annotation-Validation400", "Validation400-GT"))
        if gt is None:
            notes.append(f"{val_dir.name}/ has no ground truth (REFUGE-Validation400-GT/): validation held out")
        else:
            val = _recursive_pairs(root, val_dir, gt)
    test_dir = _first_dir(root, SPLIT_IMAGES["test"])
    if test_dir is not None:
        gt = _gt_dir(root, TEST_GT)
        if gt is None:
            notes.append(f"{test_dir.name}/ has no ground truth: no test split")
        else:
            test = _recursive_pairs(root, test_dir, gt)
    return Layout(f"REFUGE challenge ({train_dir.name}/ + {train_gt.relative_to(root)}/"
                  f"{f', {val_dir.name}/' if val else ''}{f', {test_dir.name}/' if test else ''}) in {root}",
                  RefugeCodec(), train, val, test, notes)


def _rater_folder(root: Path, folder: Path) -> list[Record]:
    records = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        images = [p for p in files if p.stem == sub.name]
        masks = [p for p in files if _RATER.match(p.stem)]
        others = [p for p in files if p not in images and p not in masks]
        if not images:
            raise UserError(f"{sub} has no image {sub.name}.jpg: add it or remove the folder")
        if not masks:
            raise UserError(f"image {images[0]} has no rater masks ({sub.name}_seg_disc_1.png, "
                            f"{sub.name}_seg_cup_1.png, ...): add them or remove the folder")
        if others:
            raise UserError(f"{others[0]} is neither the image {sub.name}.* nor a rater mask "
                            f"{sub.name}_seg_{{cup,disc}}_N.png: rename or remove it")
        if any(_RATER.match(p.stem)["name"] != sub.name for p in masks):
            bad = next(p for p in masks if _RATER.match(p.stem)["name"] != sub.name)
            raise UserError(f"rater mask {bad} does not belong to {sub.name}: move it to its image's folder")
        records.append(Record(name=sub.name, key=relative_key(images[0], root), image_path=str(images[0]),
                              mask_paths=tuple(masks)))
    if not records:
        raise UserError(f"{folder} holds no <name>/<name>.jpg sample folders: fix `data_path`")
    return records


def _multi_rater(root: Path, policy: str) -> Optional[Layout]:
    if not (root / "Training-400").is_dir():
        return None
    train = _rater_folder(root, root / "Training-400")
    test = _rater_folder(root, root / "Test-400") if (root / "Test-400").is_dir() else None
    return Layout(f"Medical-SAM-Adapter multi-rater REFUGE (Training-400/{'' if test is None else ', Test-400/'}"
                  f" <name>/<name>_seg_{{disc,cup}}_N.png; rater_policy {policy}) in {root}",
                  RaterCodec(policy), train, None, test)


def detect(options: DataOptions) -> Layout:
    root = Path(options.data_path)
    layout = _challenge(root) or _multi_rater(root, options.rater_policy)
    if layout is None:
        found = find_split_folders(root)
        if found is None:
            raise UserError(f"`data_path` {root} holds no REFUGE layout; tried {TRIED}")
        where = "split folders train/val/test/{images,masks}" if (root / "train").is_dir() else \
            "flat images/ + masks/"
        layout = Layout(f"REFUGE masks in {where} in {root}", RefugeCodec(), **found)
    if options.rater_policy != "majority" and not isinstance(layout.codec, RaterCodec):
        raise UserError(f"`rater_policy` {options.rater_policy} needs the multi-rater layout "
                        f"(Training-400/<name>/<name>_seg_cup_1.png ...), but {root} has one mask per image: "
                        f"drop `rater_policy`")
    return layout
