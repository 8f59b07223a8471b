"""Prompts derived from the final (augmented, resized, padded) masks, in pixels of the S x S model input.

Points are (x, y) = (column, row) of a pixel; boxes are xyxy with inclusive pixel coordinates
(x1 = last foreground column). Soft masks count as foreground where >= 0.5 (where > 0 if nothing is).

Empty class in a sample: clicks are padding (label -1 at (0, 0)); the box is the whole valid area
[0, 0, w-1, h-1], i.e. "the object may be anywhere".
"""
from __future__ import annotations

import cv2
import numpy as np


def foreground(mask: np.ndarray) -> np.ndarray:
    fg = mask >= 0.5
    return fg if fg.any() else mask > 0


def _pick(coords_rc: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random (row, col) entries, without replacement when there are enough."""
    chosen = rng.choice(len(coords_rc), size=count, replace=len(coords_rc) < count)
    return coords_rc[chosen]


def interior_point(fg: np.ndarray) -> tuple[int, int]:
    """(row, col) farthest from the background (maximum of the distance transform; first in raster order)."""
    padded = np.pad(fg.astype(np.uint8), 1)  # the frame's edge counts as background
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(row), int(col)


def click_prompts(masks: np.ndarray, valid_hw, n_pos: int, n_neg: int, rng: np.random.Generator,
                  train: bool) -> tuple[np.ndarray, np.ndarray]:
    """C x S x S masks -> points C x N x 2 float32 (x, y) and labels C x N int64, N = n_pos + n_neg.

    Positives come from the class's foreground, negatives from the valid area outside it. Training:
    all random. Evaluation: the first positive is the interior point, the rest come from `rng`
    (which the caller seeds per sample, so two evaluations give identical prompts).
    """
    classes = masks.shape[0]
    height, width = int(valid_hw[0]), int(valid_hw[1])
    points = np.zeros((classes, n_pos + n_neg, 2), np.float32)
    labels = np.full((classes, n_pos + n_neg), -1, np.int64)
    for c in range(classes):
        fg = foreground(masks[c, :height, :width])
        fg_rc = np.argwhere(fg)
        if len(fg_rc) == 0:
            continue  # empty class: all padding
        if train:
            pos = _pick(fg_rc, n_pos, rng)
        else:
            first = np.array([interior_point(fg)])
            pos = first if n_pos == 1 else np.concatenate([first, _pick(fg_rc, n_pos - 1, rng)])
        points[c, :n_pos] = pos[:, ::-1]
        labels[c, :n_pos] = 1
        if n_neg:
            bg_rc = np.argwhere(~fg)
            if len(bg_rc):
                points[c, n_pos:] = _pick(bg_rc, n_neg, rng)[:, ::-1]
                labels[c, n_pos:] = 0
    return points, labels


def tight_box(fg: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(fg)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)


def box_prompts(masks: np.ndarray, valid_hw, rng: np.random.Generator, train: bool,
                jitter: float = 0.1) -> np.ndarray:
    """C x S x S masks -> boxes C x 4 float32 (x0, y0, x1, y1).

    Evaluation: the tight box of each class. Training: each side moved by up to `jitter` x the box's
    width/height, clamped to the valid area.
    """
    height, width = int(valid_hw[0]), int(valid_hw[1])
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    for c in range(masks.shape[0]):
        fg = foreground(masks[c, :height, :width])
        if not fg.any():
            boxes[c] = (0, 0, width - 1, height - 1)
            continue
        box = tight_box(fg)
        if train and jitter > 0:
            size = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, np.float32)
            box = box + rng.uniform(-jitter, jitter, 4).astype(np.float32) * size
            box = np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1])
            box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]),
                            max(box[1], box[3])], np.float32)
        boxes[c] = box
    return boxes
