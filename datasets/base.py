"""The sample pipeline shared by every dataset: records, mask codecs, the mask bank and the Dataset.

A dataset module turns a folder into `Record`s grouped by split plus a `MaskCodec`. The codec reads
each record's mask file(s) into a compact uint8 "code" (validating the values) and expands a code
into C x H x W float32 class channels. All masks are read once at construction (class count,
empty-mask detection, value and size checks) and kept zlib-compressed; images are decoded lazily.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError
from common.progress import progress

from . import transforms
from .io import read_image, same_size
from .options import DataOptions
from .prompts import box_prompts, click_prompts


@dataclass
class Record:
    """One image and where its mask comes from."""

    name: str
    key: str  # identifier in the saved splits: path relative to data_path (synthetic: the name)
    image_path: str
    mask_paths: tuple = ()
    image: Optional[np.ndarray] = None  # in-memory image (synthetic)
    code: Optional[np.ndarray] = None  # in-memory mask code (synthetic)


class MaskCodec:
    """Reads mask files into uint8 codes and expands codes into float32 C x H x W channels."""

    class_names: list[str] = []
    soft = False  # True: channels may hold values strictly between 0 and 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, record: Record) -> np.ndarray:
        """uint8 code, H x W or K x H x W; raises UserError for values that fit no encoding."""
        if record.code is not None:
            return record.code
        raise NotImplementedError

    def finish(self, codes: dict[str, np.ndarray], records: dict[str, Record]) -> None:
        """Called once with every split's codes (e.g. to fix the class count from the data)."""

    def channels(self, code: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class NestedCodec(MaskCodec):
    """Code = level map 0..C; channel k is code > k (so class k+1 lies inside class k, like cup in disc)."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)

    def channels(self, code: np.ndarray) -> np.ndarray:
        return np.stack([code > k for k in range(self.num_classes)]).astype(np.float32)


class MaskBank:
    """Every record's mask code, zlib-compressed, plus which classes are non-empty."""

    def __init__(self, codes: list[np.ndarray], codec: MaskCodec):
        self._blobs = [zlib.compress(np.ascontiguousarray(c, dtype=np.uint8).tobytes(), 1) for c in codes]
        self._shapes = [c.shape for c in codes]
        self.codec = codec
        self.nonempty = np.array([[ch.any() for ch in codec.channels(c)] for c in codes], bool).reshape(
            len(codes), codec.num_classes)

    def hw(self, index: int) -> tuple[int, int]:
        return tuple(self._shapes[index][-2:])

    def code(self, index: int) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self._blobs[index]), np.uint8).reshape(self._shapes[index])

    def channels(self, index: int) -> np.ndarray:
        return self.codec.channels(self.code(index))

    def subset(self, keep: Sequence[int]) -> "MaskBank":
        other = MaskBank.__new__(MaskBank)
        other._blobs = [self._blobs[i] for i in keep]
        other._shapes = [self._shapes[i] for i in keep]
        other.codec = self.codec
        other.nonempty = self.nonempty[list(keep)].reshape(len(keep), self.codec.num_classes)
        return other


def read_codes(records: Sequence[Record], codec: MaskCodec) -> list[np.ndarray]:
    """Read every mask and check its size against the image header (the pixels stay on disk)."""
    codes = []
    for record in progress(records, desc="reading masks", disable=len(records) < 200):
        code = codec.read(record)
        if record.image is not None:
            if record.image.shape[:2] != code.shape[-2:]:
                raise UserError(f"internal: image and mask of {record.name} differ in size")
        else:
            mask_path = record.mask_paths[0] if record.mask_paths else "its mask"
            same_size(Path(record.image_path), mask_path, code.shape[-2:])
        codes.append(code)
    return codes


class SegmentationDataset(Dataset):
    """Images with masks -> sample dicts (see datasets/__init__.py for the keys)."""

    def __init__(self, records: Sequence[Record], bank: MaskBank, options: DataOptions, train: bool):
        self.records = list(records)
        self.bank = bank
        self.codec = bank.codec
        self.options = options
        self.train = train
        self.size = options.image_size
        # -roi_crop: every split is cropped around the ground-truth disc, so validation and test measure
        # what the run trained on (the evaluated frame, original_hw, is then the crop)
        self.roi_crop = bool(options.roi_crop)
        self.augment = transforms.build_augment(options.aug) if train else None
        self.epoch = 0
        self.resized_cache: dict[int, tuple] = {}  # -cache_images (one copy per loader worker)

    def set_epoch(self, epoch: int) -> None:
        """Training randomness is a function of (seed, epoch, sample name): identical for any number of
        processes or loader workers, and after a resume."""
        self.epoch = epoch

    @property
    def class_names(self) -> list[str]:
        return self.codec.class_names

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def drop_empty(self) -> int:
        """Remove samples whose every class is empty (they give no click or box); returns how many."""
        keep = [i for i in range(len(self.records)) if self.bank.nonempty[i].any()]
        dropped = len(self.records) - len(keep)
        if dropped:
            self.records = [self.records[i] for i in keep]
            self.bank = self.bank.subset(keep)
        return dropped

    def truncate(self, limit: Optional[int]) -> None:
        if limit is not None and limit < len(self.records):
            self.records = self.records[:limit]
            self.bank = self.bank.subset(range(limit))

    def __len__(self) -> int:
        return len(self.records)

    def original_mask(self, index: int) -> np.ndarray:
        """C x H x W float32 mask of sample `index` at its image's original size (what final metrics use)."""
        return self.bank.channels(index)

    def load_image(self, index: int) -> np.ndarray:
        record = self.records[index]
        return record.image if record.image is not None else read_image(Path(record.image_path))

    def load_resized(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Decoded image and its mask (H x W x C), ROI-cropped (every split) if asked, resized longest-side
        to S: the deterministic part of the pipeline, which -cache_images keeps in memory."""
        record = self.records[index]
        image = self.load_image(index)
        mask = self.bank.channels(index)
        if image.shape[:2] != mask.shape[1:]:
            raise UserError(f"image {record.image_path} decodes to {image.shape[1]}x{image.shape[0]} but its "
                            f"mask is {mask.shape[2]}x{mask.shape[1]}: masks must match their images")
        mask = np.ascontiguousarray(mask.transpose(1, 2, 0))
        if self.roi_crop:
            image, mask = transforms.roi_crop(image, mask)
        original_hw = image.shape[:2]
        image, mask = transforms.resize_longest(image, mask, self.size)
        return image, mask, original_hw

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        name_hash = zlib.crc32(record.name.encode())
        if self.train:
            seed = int(np.random.default_rng([self.options.seed, self.epoch, name_hash]).integers(2 ** 31 - 1))
            rng = np.random.default_rng(seed)
        else:
            seed = None
            rng = np.random.default_rng([self.options.seed, name_hash])
        resized = self.resized_cache.get(index)
        if resized is None:
            resized = self.load_resized(index)
            if self.options.cache_images:
                self.resized_cache[index] = resized
        image, mask, original_hw = resized
        if self.augment is not None:
            transforms.reseed(self.augment, seed)
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            image, mask = transforms.resize_longest(image, mask, self.size)
        mask = np.clip(mask, 0, 1) if self.codec.soft else (mask >= 0.5).astype(np.float32)
        valid_hw = image.shape[:2]
        image = transforms.pad_to(image, self.size)
        mask = transforms.pad_to(mask, self.size).transpose(2, 0, 1)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)),
            "valid_hw": torch.tensor(valid_hw, dtype=torch.int64),
            "original_hw": torch.tensor(original_hw, dtype=torch.int64),
            "name": record.name,
            "image_path": record.image_path,
        }
        add_prompts(sample, mask, valid_hw, self.options, rng, self.train)
        return sample


def add_prompts(sample: dict, mask: np.ndarray, valid_hw, options: DataOptions, rng: np.random.Generator,
                train: bool) -> None:
    if options.prompt == "click":
        points, labels = click_prompts(mask, valid_hw, options.n_points, options.n_neg_points, rng, train)
        sample["points"] = torch.from_numpy(points)
        sample["point_labels"] = torch.from_numpy(labels)
    elif options.prompt == "box":
        sample["boxes"] = torch.from_numpy(box_prompts(mask, valid_hw, rng, train))


@dataclass
class Layout:
    """What a dataset module found: a description, records per split (val/test None when absent)."""

    description: str
    codec: MaskCodec
    train: list[Record]
    val: Optional[list[Record]] = None
    test: Optional[list[Record]] = None
    notes: list[str] = field(default_factory=list)
