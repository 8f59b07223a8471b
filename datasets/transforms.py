"""Geometry and augmentation of one (image, mask) pair: ROI crop, longest-side resize, augment, pad.

Images are H x W x 3 uint8, masks H x W x C float32 in [0, 1]. The pipeline resizes the longest side to
S *before* augmenting (the augmentations keep the frame size, so this equals augment-then-resize and
is much cheaper on large photographs), then pads bottom/right with zeros to S x S.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np

if TYPE_CHECKING:
    import albumentations as A

AUG_LEVELS = ("none", "light", "strong")


def build_augment(level: str) -> Optional[A.Compose]:
    """Training augmentation applied jointly to image and mask; None for "none".

    light: horizontal/vertical flips and small brightness/contrast changes.
    strong: light plus small rotations (+-15 deg), scales (0.9..1.1), shifts (+-5%) and colour jitter.
    """
    if level == "none":
        return None
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A  # imported by the training sets only: a process that builds none skips its 60 MB

    steps = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
             A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
    if level == "strong":
        steps += [A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.05, 0.05),
                           border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
                  A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.5)]
    elif level != "light":
        raise ValueError(f"unknown augmentation level {level}")
    return A.Compose(steps)


def reseed(augment: A.Compose, seed: int) -> None:
    """Seed a Compose for one call. Compose.set_random_seed gives every transform the *same* seed, which
    ties their random draws together (both flips always fire together); give each its own stream."""
    augment.set_random_seed(seed)
    states = np.random.SeedSequence(seed).generate_state(len(augment.transforms))
    for transform, state in zip(augment.transforms, states):
        transform.set_random_seed(int(state))


def _resize(array: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    if array.ndim == 3 and out.ndim == 2:  # cv2 drops a single trailing channel
        out = out[..., None]
    return out


def _resize_mask(mask: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    if mask.shape[2] <= 4:
        return _resize(mask, width, height, interpolation)
    return np.stack([_resize(mask[..., c], width, height, interpolation) for c in range(mask.shape[2])], axis=2)


def scaled_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """Size after resizing the longest side to `size`, aspect kept (what valid_hw reports)."""
    scale = size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_longest(image: np.ndarray, mask: Optional[np.ndarray], size: int):
    """Resize so that the longest side is `size` (area averaging down, bilinear up)."""
    height, width = image.shape[:2]
    new_h, new_w = scaled_hw(height, width, size)
    if (new_h, new_w) == (height, width):
        return image, mask
    interpolation = cv2.INTER_AREA if new_h * new_w < height * width else cv2.INTER_LINEAR
    image = _resize(image, new_w, new_h, interpolation)
    if mask is not None:
        mask = _resize_mask(mask.astype(np.float32, copy=False), new_w, new_h, interpolation)
    return image, mask


def pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the bottom and right of an H x W (x C) array to size x size."""
    height, width = array.shape[:2]
    pad = [(0, size - height), (0, size - width)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad)


def roi_box(disc: np.ndarray, margin: float = 0.5) -> Optional[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) crop around the non-zero region of `disc`, grown by margin x its size on each side."""
    rows, cols = np.nonzero(disc > 0)
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    grow_y, grow_x = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
    height, width = disc.shape
    return max(0, y0 - grow_y), min(height, y1 + grow_y), max(0, x0 - grow_x), min(width, x1 + grow_x)


def roi_crop(image: np.ndarray, mask: np.ndarray, margin: float = 0.5):
    """Crop image and mask around mask channel 0 (REFUGE: the optic disc); unchanged when it is empty."""
    box = roi_box(mask[..., 0], margin)
    if box is None:
        return image, mask
    y0, y1, x0, x1 = box
    return np.ascontiguousarray(image[y0:y1, x0:x1]), np.ascontiguousarray(mask[y0:y1, x0:x1])
