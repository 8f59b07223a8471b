"""Reading images and masks from disk, listing and pairing files; every failure is a one-line UserError."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from common.errors import UserError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail loudly, never decode half grey

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
# Mask file stems may carry one of these suffixes after the image stem (case-insensitive).
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_gt", "_label")
# Files that sit beside images in official releases but are not images of the data set.
IGNORED_STEM_ENDINGS = ("_superpixels",)


def is_image_file(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")
            and not path.stem.lower().endswith(IGNORED_STEM_ENDINGS))


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder (sorted), skipping hidden files and superpixel maps."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in entries if is_image_file(p))


def image_hw(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    if not path.is_file():
        raise UserError(f"image {path} does not exist: fix the path or the listing that names it")
    try:
        with Image.open(path) as img:
            width, height = img.size
            refuse_multipage(img, path, "image")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({_short(exc)}): replace it with a valid image file or remove it")
    return height, width


def refuse_multipage(img: Image.Image, path: Path, kind: str) -> None:
    """A multi-page TIFF (a stack or volume) would silently be read as its first page: refuse it."""
    pages = getattr(img, "n_frames", 1)
    if pages > 1 and img.format == "TIFF":
        raise UserError(f"{kind} {path} is a multi-page TIFF ({pages} pages): convert it to one 2D file per "
                        f"slice, or to NIfTI and use `dataset` nifti")


def read_image(path: Path) -> np.ndarray:
    """Decode an image as H x W x 3 uint8 RGB; any decoding failure is a UserError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_uint8(img)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image {path} disappeared since the data set was listed: restore it or rebuild")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot decode image {path} ({_short(exc)}; truncated or corrupt?): "
                        f"re-download or remove it")


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float scans: stretch to 0..255
        arr = np.asarray(img, dtype=np.float32)
        low, high = float(arr.min()), float(arr.max())
        arr = (arr - low) / max(high - low, 1e-6) * 255.0
        arr = np.repeat(arr.round().astype(np.uint8)[..., None], 3, axis=2)
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask as a single-channel H x W integer array (values as stored, no thresholding).

    Greyscale files give their grey levels; palette files give grey levels when the palette is grey,
    else their indices (label maps); colour files must have three equal channels.
    """
    if not path.is_file():
        raise UserError(f"mask {path} does not exist: fix the path or the listing that names it")
    try:
        with Image.open(path) as img:
            refuse_multipage(img, path, "mask")
            img.load()
            if img.mode == "P":
                palette = np.asarray(img.getpalette() or [], dtype=np.int32).reshape(-1, 3)
                grey = len(palette) == 0 or bool((palette[:, 0] == palette[:, 1]).all()
                                                 and (palette[:, 1] == palette[:, 2]).all())
                arr = np.asarray(img.convert("L")) if grey else np.asarray(img)
            elif img.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                rgb = np.asarray(img.convert("RGB"))
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                    raise UserError(f"mask {path} is a colour image: save masks as single-channel "
                                    f"greyscale (0/255, 0/1 or labels 0..3)")
                arr = rgb[..., 0]
            elif img.mode in ("LA", "PA"):
                arr = np.asarray(img.convert("L"))
            elif img.mode == "1":
                arr = np.asarray(img, dtype=np.uint8)
            else:
                arr = np.asarray(img)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot decode mask {path} ({_short(exc)}; truncated or corrupt?): re-export or remove it")
    if arr.ndim != 2:
        raise UserError(f"mask {path} has shape {arr.shape}: save masks as single-channel images")
    return arr


def binary_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    """0/255 (thresholded > 127, tolerating JPEG noise) or 0/1 -> uint8 0/1; anything else is a UserError."""
    top = int(arr.max()) if arr.size else 0
    if top <= 1:
        return (arr > 0).astype(np.uint8)
    if top < 128:
        raise UserError(f"mask {path} has values up to {top}, which fit no binary encoding (0/255 or 0/1): "
                        f"re-export it as 0 background / 255 foreground")
    return (arr > 127).astype(np.uint8)


def same_size(image: Path, mask: Path, mask_hw: Sequence[int]) -> tuple[int, int]:
    """Check an image (header only) has the mask's size; returns the image's (height, width)."""
    hw = image_hw(image)
    if tuple(hw) != tuple(mask_hw):
        raise UserError(f"image {image} is {hw[1]}x{hw[0]} but its mask {mask} is {mask_hw[1]}x{mask_hw[0]} "
                        f"(width x height): masks must match their images pixel for pixel")
    return hw


def strip_mask_suffix(stem: str) -> Optional[str]:
    lower = stem.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def pair_by_stem(images: Iterable[Path], masks: Iterable[Path], image_where: str,
                 mask_where: str) -> list[tuple[Path, Path]]:
    """Pair image and mask files by stem (a mask may add _segmentation, _mask, ...); orphans are errors."""
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise UserError(f"two images share the name {image.stem} ({by_stem[image.stem]} and {image}): "
                            f"keep one")
        by_stem[image.stem] = image
    mask_of: dict[str, Path] = {}
    for mask in masks:
        stem = mask.stem
        if stem not in by_stem:
            stripped = strip_mask_suffix(stem)
            if stripped is None or stripped not in by_stem:
                raise UserError(f"mask {mask} has no image of the same name in {image_where}: add the image "
                                f"or remove the mask")
            stem = stripped
        if stem in mask_of:
            raise UserError(f"image {by_stem[stem]} has two masks ({mask_of[stem]} and {mask}): keep one")
        mask_of[stem] = mask
    for stem, image in by_stem.items():
        if stem not in mask_of:
            raise UserError(f"image {image} has no mask in {mask_where} (expected {stem}.png or "
                            f"{stem}_segmentation.png): add the mask or remove the image")
    return [(by_stem[stem], mask_of[stem]) for stem in sorted(by_stem)]


def read_pair_csv(csv_path: Path, root: Path) -> list[tuple[Path, Path]]:
    """A listing with one image and one mask path per row (relative to root); a header row is skipped.

    Any columns are allowed; the first two cells that name image files are the image and the mask.
    """
    pairs = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read listing {csv_path} ({_short(exc)}): fix or remove it")
    for line, row in enumerate(rows, start=1):
        files = [cell.strip() for cell in row if Path(cell.strip()).suffix.lower() in IMAGE_EXTS]
        if not files:
            if line == 1 or not any(cell.strip() for cell in row):
                continue  # header or blank line
            raise UserError(f"{csv_path} line {line} names no image file: each row needs image,mask paths")
        if len(files) < 2:
            raise UserError(f"{csv_path} line {line} names only {files[0]}: each row needs image,mask paths")
        image, mask = (_resolve(root, f, csv_path) for f in files[:2])
        for kind, path, text in (("image", image, files[0]), ("mask", mask, files[1])):
            if not path.is_file():
                raise UserError(f"{csv_path} line {line} lists {kind} {text}, which is not in {root}: "
                                f"fix the listing or restore the file")
        pairs.append((image, mask))
    if not pairs:
        raise UserError(f"listing {csv_path} has no image,mask rows: fill it or remove it")
    return pairs


def _resolve(root: Path, text: str, csv_path: Path) -> Path:
    path = Path(text.replace("\\", "/"))
    if path.is_absolute():
        return path
    first = root / path
    if first.exists():
        return first
    beside = csv_path.parent / path
    return beside if beside.exists() else first


def relative_key(path: Path, root: Path) -> str:
    """The identifier a file is saved under in a split listing: its path relative to the data root."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _short(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
