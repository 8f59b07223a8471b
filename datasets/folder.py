"""`-dataset folder`: DATA/{train,val,test}/{images,masks}/ or DATA/images + DATA/masks, paired by stem.

Masks: binary 0/255 (JPEG noise tolerated, thresholded > 127) or 0/1 for one class, or integer labels
0..K (K <= 3) for K classes, where channel k-1 is label == k. The class count comes from the data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from common.errors import UserError

from .base import Layout, MaskCodec, Record
from .options import DataOptions
from .io import list_images, pair_by_stem, read_mask, relative_key

MAX_LABEL = 3
SPLITS = ("train", "val", "test")
VAL_NAMES = ("val", "valid", "validation")


def pairs_to_records(pairs, root: Path) -> list[Record]:
    return [Record(name=image.stem, key=relative_key(image, root), image_path=str(image), mask_paths=(mask,))
            for image, mask in pairs]


def paired_folder(folder: Path, root: Path) -> list[Record]:
    """folder/images + folder/masks -> records; an empty images/ is an error."""
    images, masks = folder / "images", folder / "masks"
    if not masks.is_dir():
        raise UserError(f"{images} has no sibling masks/ folder: put the masks in {masks}")
    image_files = list_images(images)
    if not image_files:
        raise UserError(f"{images} holds no images ({', '.join(('.png', '.jpg', '.bmp', '.tif'))} ...): "
                        f"add images or fix `data_path`")
    return pairs_to_records(pair_by_stem(image_files, list_images(masks), str(images), str(masks)), root)


def find_split_folders(root: Path) -> Optional[dict]:
    """{train, val, test} records for root/<split>/{images,masks}, root/images + masks, else None."""
    if (root / "train" / "images").is_dir():
        found = {"train": paired_folder(root / "train", root), "val": None, "test": None}
        for name in VAL_NAMES:
            if (root / name / "images").is_dir():
                found["val"] = paired_folder(root / name, root)
                break
        if (root / "test" / "images").is_dir():
            found["test"] = paired_folder(root / "test", root)
        return found
    if (root / "images").is_dir():
        return {"train": paired_folder(root, root), "val": None, "test": None}
    return None


class LabelCodec(MaskCodec):
    """Binary (0/255, 0/1) or label (0..3) masks; code = label map; channel k-1 = (code == k)."""

    def __init__(self):
        self.class_names = ["foreground"]
        self._kind: dict[str, tuple[str, int, str]] = {}  # key -> (encoding, top label, mask path)

    def read(self, record: Record) -> np.ndarray:
        path = record.mask_paths[0]
        arr = read_mask(path)
        values = np.unique(arr)
        top = int(values[-1]) if values.size else 0
        if top <= MAX_LABEL:
            kind = ("labels", top)
            code = arr.astype(np.uint8)
        elif set(values.tolist()) <= {0, 255} or _noisy_binary(arr):
            kind = ("0/255", 1)
            code = (arr > 127).astype(np.uint8)
        else:
            shown = ", ".join(str(v) for v in values[:6]) + (" ..." if values.size > 6 else "")
            raise UserError(f"mask {path} has values {{{shown}}} that fit no encoding: use 0/255 or 0/1 for "
                            f"one class, or labels 0..{MAX_LABEL} for several")
        self._kind[record.key] = (kind[0], kind[1], str(path))
        return code

    def finish(self, codes, records) -> None:
        top = max((k[1] for k in self._kind.values()), default=1)
        if top > 1:
            binary = [k for k in self._kind.values() if k[0] == "0/255"]
            if binary:
                example = next(k for k in self._kind.values() if k[1] == top)
                raise UserError(f"mask {binary[0][2]} is 0/255 binary but mask {example[2]} holds labels up to "
                                f"{top}: use one encoding for all masks")
        classes = max(1, top)
        self.class_names = ["foreground"] if classes == 1 else [f"class{k}" for k in range(1, classes + 1)]

    def channels(self, code: np.ndarray) -> np.ndarray:
        return np.stack([code == k for k in range(1, self.num_classes + 1)]).astype(np.float32)


def _noisy_binary(arr: np.ndarray) -> bool:
    """A lossy-compressed 0/255 mask: nearly all pixels close to 0 or 255."""
    middle = np.count_nonzero((arr > 30) & (arr < 225))
    return int(arr.max()) >= 225 and middle <= 0.02 * arr.size


def detect(options: DataOptions) -> Layout:
    root = Path(options.data_path)
    found = find_split_folders(root)
    if found is None:
        raise UserError(f"`data_path` {root} holds no folder layout: tried {root}/train/images + "
                        f"{root}/train/masks (with optional val/, test/) and {root}/images + {root}/masks")
    if (root / "train" / "images").is_dir():
        parts = ["train"] + [s for s in ("val", "test") if found[s] is not None]
        description = f"split folders {'/'.join(parts)}/{{images,masks}} in {root}"
    else:
        description = f"one images/ + masks/ folder pair in {root}"
    return Layout(description=description, codec=LabelCodec(), **found)
