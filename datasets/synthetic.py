"""The embedded default data set: lesion-like blobs generated from the seed, no files needed.

Each image is 96..192 px on each side (non-square, to exercise resizing), with a smooth coloured
background, low-frequency shading, pixel noise and a few small distractor spots. The object is an
irregular star-shaped blob (random low harmonics of the radius), darker and textured. With two
classes a second blob is nested inside the first, brighter (like an optic cup inside the disc).
train has synthetic_size images; val and test a quarter each, from different seed streams.
"""
from __future__ import annotations

import cv2
import numpy as np


from .base import Layout, NestedCodec, Record
from .options import DataOptions

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _blob(rng: np.random.Generator, height: int, width: int, cy: float, cx: float, radius: float,
          wobble: float = 0.18) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    angle = np.arctan2(dy, dx)
    edge = np.ones_like(angle)
    for k in range(2, 6):
        edge += rng.uniform(0, wobble / (k - 1)) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) < radius * edge


def make_sample(rng: np.random.Generator, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (H x W x 3 uint8 image, H x W uint8 level map 0..classes)."""
    height, width = (int(v) for v in rng.integers(96, 193, size=2))
    base = rng.uniform(110, 210, 3).astype(np.float32)
    shade = _smooth_noise(rng, height, width, 3)[..., None] * rng.uniform(8, 20)
    image = base + shade + rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):  # small distractor spots (not part of the mask)
        spot = _blob(rng, height, width, rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, 5))
        image[spot] *= rng.uniform(0.75, 0.9)
    short = min(height, width)
    cy = rng.uniform(0.35, 0.65) * height
    cx = rng.uniform(0.35, 0.65) * width
    radius = rng.uniform(0.16, 0.3) * short
    outer = _blob(rng, height, width, cy, cx, radius)
    level = outer.astype(np.uint8)
    texture = _smooth_noise(rng, height, width, 8)[..., None]
    if classes == 1:  # dark pigmented lesion with mottled texture
        tint = rng.uniform(0.35, 0.6) * np.array([1.0, rng.uniform(0.7, 0.9), rng.uniform(0.6, 0.9)], np.float32)
        lesion = image * tint + texture * 12
    else:  # bright disc with a brighter nested cup
        lesion = image * 0.6 + 90 + texture * 8
        inner = _blob(rng, height, width, cy + rng.uniform(-0.1, 0.1) * radius,
                      cx + rng.uniform(-0.1, 0.1) * radius, radius * rng.uniform(0.4, 0.6), wobble=0.1) & outer
        level[inner] = 2
    alpha = cv2.GaussianBlur(outer.astype(np.float32), (5, 5), 1.0)[..., None]  # soft edge in the image only
    image = image * (1 - alpha) + lesion * alpha
    if classes == 2:
        alpha2 = cv2.GaussianBlur((level == 2).astype(np.float32), (5, 5), 1.0)[..., None]
        image = image * (1 - alpha2) + np.minimum(image + 45, 255) * alpha2
    return np.clip(image, 0, 255).astype(np.uint8), level


def detect(options: DataOptions) -> Layout:
    classes = options.synthetic_classes
    count = {"train": options.synthetic_size, "val": max(1, options.synthetic_size // 4),
             "test": max(1, options.synthetic_size // 4)}
    splits = {}
    for split, stream in SPLIT_STREAMS.items():
        records = []
        for i in range(count[split]):
            rng = np.random.default_rng([options.seed, stream, i, classes])
            image, level = make_sample(rng, classes)
            name = f"synthetic_{split}_{i:04d}"
            records.append(Record(name=name, key=name, image_path=f"synthetic/{split}/{name}.png",
                                  image=image, code=level))
        splits[split] = records
    names = ["lesion"] if classes == 1 else ["outer", "inner"]
    what = "lesion-like blobs" if classes == 1 else "nested outer/inner blobs (disc/cup-like)"
    return Layout(description=f"synthetic {what} generated from seed {options.seed} (no files)",
                  codec=NestedCodec(names), **splits)
