"""`-images DIR`: a folder of images without masks, for prediction (val.py).

Samples carry image, valid_hw, original_hw, name, image_path, plus "boxes" C x 4 when -boxes FILE.csv
is given: rows image,x0,y0,x1,y1 in original pixels (image = file name or stem; a header row is optional),
mapped into the S x S frame and clamped to the valid area; every class gets the same box.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError

from . import transforms
from .io import list_images, read_image


def read_boxes(path: Path, images: list[Path]) -> dict[str, np.ndarray]:
    """CSV image,x0,y0,x1,y1 -> {image stem: box}; unknown images, bad numbers and missing rows are errors."""
    if not path.is_file():
        raise UserError(f"`boxes` {path} does not exist: give a CSV with rows image,x0,y0,x1,y1")
    by_name = {p.name: p.stem for p in images} | {p.stem: p.stem for p in images}
    boxes: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            try:
                values = np.array([float(v) for v in cells[1:5]], np.float32)
                if len(cells) < 5:
                    raise ValueError
            except ValueError:
                if line == 1:
                    continue  # header
                raise UserError(f"`boxes` {path} line {line} is not image,x0,y0,x1,y1 with numbers: fix the row")
            if cells[0] not in by_name:
                raise UserError(f"`boxes` {path} line {line} names {cells[0]}, which is not an image in the "
                                f"`images` folder: fix the name or remove the row")
            if values[2] < values[0] or values[3] < values[1]:
                raise UserError(f"`boxes` {path} line {line}: x1 < x0 or y1 < y0; boxes are x0,y0,x1,y1")
            boxes[by_name[cells[0]]] = values
    missing = [p for p in images if p.stem not in boxes]
    if missing:
        raise UserError(f"`boxes` {path} has no box for {missing[0].name} ({len(missing)} images lack one): "
                        f"add a row {missing[0].name},x0,y0,x1,y1")
    return boxes


class ImageFolderDataset(Dataset):
    """Every image of `folder` as an unlabelled sample at S = image_size, with `boxes` (CSV) if given."""

    def __init__(self, folder: str, image_size: int, num_classes: int, boxes: Optional[str] = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"`images` {folder} is not a folder: give a folder of images")
        self.paths = list_images(folder)
        if not self.paths:
            raise UserError(f"`images` {folder} holds no images (.png/.jpg/.bmp/.tif): fix the path")
        self.size = image_size
        self.num_classes = num_classes
        self.boxes = read_boxes(Path(boxes), self.paths) if boxes else None

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> np.ndarray:
        """The original H x W x 3 uint8 RGB image."""
        return read_image(self.paths[index])

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = self.load_image(index)
        original_hw = image.shape[:2]
        image, _ = transforms.resize_longest(image, None, self.size)
        valid_hw = image.shape[:2]
        image = transforms.pad_to(image, self.size)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "valid_hw": torch.tensor(valid_hw, dtype=torch.int64),
            "original_hw": torch.tensor(original_hw, dtype=torch.int64),
            "name": path.stem,
            "image_path": str(path),
        }
        if self.boxes is not None:
            scale_y, scale_x = valid_hw[0] / original_hw[0], valid_hw[1] / original_hw[1]
            box = self.boxes[path.stem] * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
            box = np.clip(box, 0, [valid_hw[1] - 1, valid_hw[0] - 1] * 2).astype(np.float32)
            sample["boxes"] = torch.from_numpy(np.repeat(box[None], self.num_classes, axis=0))
        return sample


def build_image_folder(folder: str, image_size: int, num_classes: int,
                       boxes: Optional[str] = None) -> ImageFolderDataset:
    """The -images folder as a Dataset of unlabelled samples (see the module docstring for the keys)."""
    return ImageFolderDataset(folder, image_size, num_classes, boxes)
