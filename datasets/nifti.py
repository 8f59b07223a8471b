"""`-dataset nifti`: CT/MR volumes (NIfTI) with label volumes, trained and predicted slice by slice.

Layouts (first found wins): DATA/imagesTr + DATA/labelsTr (Medical Segmentation Decathlon; nnU-Net's
`_0000` channel suffix on image names is accepted), DATA/images + DATA/masks, DATA/images + DATA/labels;
image and label volumes are paired by name (`case.nii.gz` with `case.nii.gz`).

Volumes are read with MONAI (`LoadImage`, then `Orientation` to RAS, a pure axis permutation / flip:
no resampling) and split by VOLUME into train / val / test (each hold-out `-val_frac` of the volumes, at
least one, seeded by `-seed`), never by slice. A slice is the 2D array along `-slice_axis` (0: sagittal,
1: coronal, 2: axial in RAS), rows and columns the remaining RAS axes in order.

Intensity: `-window L,W` maps [L - W/2, L + W/2] to 0..255 (CT, e.g. 40,400 soft tissue); otherwise each
volume is clipped to its own 0.5 / 99.5 percentiles and scaled to 0..255. The grey slice is repeated
into the 3 channels the nets expect, then resized longest-side and padded like every 2D image.

Classes: label values map to classes (`-labels 1,2` picks and orders them; default every non-zero
value found, at most 3, the decoder's limit); names come from DATA/dataset.json when present.

Samples are the 2D samples of datasets/__init__.py (name `<volume>_<axis><slice>`) plus `present`
(bool C): which classes the slice's mask (the prompt source) holds. Training uses only slices with
foreground; evaluation and prediction datasets hold every slice of every volume (`is_volumes`).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.errors import UserError

from . import transforms
from .io import relative_key
from .options import DataOptions
from .prompts import box_prompts, click_prompts

NIFTI_EXTS = (".nii.gz", ".nii")
LAYOUTS = (("imagesTr", "labelsTr"), ("images", "masks"), ("images", "labels"))
AXIS_LETTERS = "xyz"
MAX_CLASSES = 3
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
PERCENTILES = (0.5, 99.5)


# ----------------------------------------------------------------------------------------- files
def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not path.name.startswith(".") and name.endswith(NIFTI_EXTS)


def nifti_stem(path: Path) -> str:
    name = path.name
    for ext in NIFTI_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def list_volumes(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_nifti(p)) if Path(folder).is_dir() else []


def volume_shape(path: Path, kind: str) -> tuple[int, int, int]:
    """The 3D shape from the header (no voxels read); 4D volumes with more than one frame are refused."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several types for broken files
        raise UserError(f"cannot read {kind} volume {path} ({_short(exc)}): replace it with a valid NIfTI file")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UserError(f"{kind} volume {path} is {len(shape)}D {'x'.join(map(str, shape))}: give one 3D volume "
                        f"per file (split multi-channel / time series volumes into 3D files)")
    if len(shape) < 3:
        raise UserError(f"{kind} volume {path} is {len(shape)}D {'x'.join(map(str, shape))}, not a 3D volume: "
                        f"use `dataset` folder for 2D images")
    return shape  # type: ignore[return-value]


def pair_volumes(images: Sequence[Path], labels: Sequence[Path], image_dir: Path,
                 label_dir: Path) -> list[tuple[Path, Path]]:
    """Pair image and label volumes by name (an image may carry nnU-Net's _0000 channel suffix)."""
    by_name = {nifti_stem(p): p for p in labels}
    pairs, used = [], set()
    for image in images:
        stem = nifti_stem(image)
        name = stem if stem in by_name else (stem[:-5] if stem.endswith("_0000") else stem)
        if name not in by_name:
            raise UserError(f"image volume {image} has no label volume of the same name in {label_dir}: "
                            f"add {label_dir / (name + '.nii.gz')} or remove the image")
        if name in used:
            raise UserError(f"two image volumes pair with label {by_name[name]}: keep one")
        used.add(name)
        pairs.append((image, by_name[name]))
    orphans = sorted(set(by_name) - used)
    if orphans:
        raise UserError(f"label volume {by_name[orphans[0]]} has no image volume of the same name in {image_dir}: "
                        f"add the image or remove the label")
    return pairs


def find_layout(root: Path) -> tuple[Path, Path]:
    for images, labels in LAYOUTS:
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    tried = " and ".join(f"{root}/{i} + {root}/{m}" for i, m in LAYOUTS)
    raise UserError(f"`data_path` {root} holds no NIfTI layout: tried {tried}")


# ----------------------------------------------------------------------------------------- reading
def load_ras(path: Path) -> np.ndarray:
    """The 3D voxel array (float32) of a NIfTI file, reoriented to RAS with MONAI."""
    from monai.transforms import LoadImage, Orientation

    try:
        volume = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(path))
    except Exception as exc:
        raise UserError(f"cannot read volume {path} ({_short(exc)}): replace it with a valid NIfTI file")
    while volume.ndim > 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    volume = Orientation(axcodes="RAS", labels=RAS_LABELS)(volume)
    return np.asarray(volume[0].numpy(), dtype=np.float32)


def ras_to_file_orientation(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo the RAS reorientation: an array in RAS back to the voxel order of a file with `affine`."""
    from nibabel import orientations as ornt

    source = ornt.io_orientation(affine)
    return ornt.apply_orientation(array, ornt.ornt_transform(ornt.axcodes2ornt("RAS"), source))


def parse_window(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        level, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"`window` {text} is not L,W (two numbers, e.g. `window` 40,400 for CT soft tissue)")
    if width <= 0:
        raise UserError(f"`window` {text}: the width must be positive (e.g. `window` 40,400)")
    return level, width


def parse_labels(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise UserError(f"`labels` {text} is not a comma-separated list of label values (e.g. `labels` 1,2)")
    if any(v <= 0 for v in values) or len(set(values)) != len(values):
        raise UserError(f"`labels` {text}: give distinct positive label values (0 is background)")
    if len(values) > MAX_CLASSES:
        raise UserError(f"`labels` {text} picks {len(values)} classes but the decoder gives at most {MAX_CLASSES}: "
                        f"pick up to {MAX_CLASSES}")
    return values


def to_uint8(volume: np.ndarray, window: Optional[tuple[float, float]]) -> np.ndarray:
    """CT window L,W, else the volume's own 0.5-99.5 percentile range, mapped to 0..255."""
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        low, high = (float(v) for v in np.percentile(volume, PERCENTILES))
    scaled = (np.clip(volume, low, high) - low) / max(high - low, 1e-6) * 255.0
    return np.rint(scaled).astype(np.uint8)


def read_label_values(path: Path) -> np.ndarray:
    """A label volume in RAS as int32; non-integer values are refused."""
    volume = load_ras(path)
    rounded = np.rint(volume)
    if not np.allclose(volume, rounded, atol=1e-3):
        raise UserError(f"label volume {path} holds non-integer values (resampled with interpolation?): "
                        f"labels must be integers; resample with nearest neighbour")
    if rounded.min() < 0:
        raise UserError(f"label volume {path} holds negative values: labels are 0 (background) and 1, 2, ...")
    return rounded.astype(np.int32)


def class_names_from_json(root: Path, values: Sequence[int]) -> list[str]:
    """Names of label values from DATA/dataset.json ({"labels": {"1": "liver"}} or {"liver": 1})."""
    names = {}
    path = root / "dataset.json"
    if path.is_file():
        try:
            labels = json.loads(path.read_text()).get("labels", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"cannot read {path} ({_short(exc)}): fix the JSON or remove it")
        for key, value in dict(labels).items():
            if str(key).lstrip("-").isdigit():
                names[int(key)] = str(value)
            elif isinstance(value, int):
                names[value] = str(key)
    return ["".join(c if c.isalnum() or c in "-_" else "_" for c in names.get(v, f"label{v}")) for v in values]


# ----------------------------------------------------------------------------------------- volumes
def _pack(volume: np.ndarray, axis: int) -> list[bytes]:
    return [zlib.compress(np.ascontiguousarray(s, dtype=np.uint8).tobytes(), 1) for s in np.moveaxis(volume, axis, 0)]


@dataclass
class Volume:
    """One image volume (intensities loaded lazily) and, when known, its class-code volume.

    Codes are 0 background, k for class k (the k-th chosen label value); both are kept per slice,
    zlib-compressed. `present` is n_slices x C: which classes each slice holds.
    """

    name: str
    key: str
    image_path: str
    shape: tuple  # RAS shape
    axis: int
    label_path: Optional[str] = None
    code_slices: Optional[list] = None
    present: Optional[np.ndarray] = None
    image_slices: Optional[list] = field(default=None, repr=False)

    @property
    def n_slices(self) -> int:
        return self.shape[self.axis]

    @property
    def slice_hw(self) -> tuple[int, int]:
        return tuple(s for i, s in enumerate(self.shape) if i != self.axis)  # type: ignore[return-value]

    def set_codes(self, codes: np.ndarray, num_classes: int) -> None:
        self.code_slices = _pack(codes, self.axis)
        per_slice = np.moveaxis(codes, self.axis, 0).reshape(self.n_slices, -1)
        self.present = np.stack([(per_slice == k).any(1) for k in range(1, num_classes + 1)], axis=1)

    def code(self, k: int) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self.code_slices[k]), np.uint8).reshape(self.slice_hw)

    def code_volume(self) -> np.ndarray:
        return np.moveaxis(np.stack([self.code(k) for k in range(self.n_slices)]), 0, self.axis)

    def image(self, k: int, window) -> np.ndarray:
        if self.image_slices is None:
            volume = load_ras(Path(self.image_path))
            if tuple(volume.shape) != tuple(self.shape):
                raise UserError(f"image volume {self.image_path} is {'x'.join(map(str, volume.shape))} but its "
                                f"labels are {'x'.join(map(str, self.shape))}: they must match voxel for voxel")
            self.image_slices = _pack(to_uint8(volume, window), self.axis)
        return np.frombuffer(zlib.decompress(self.image_slices[k]), np.uint8).reshape(self.slice_hw)


def codes_from_labels(values: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    codes = np.zeros(values.shape, np.uint8)
    for k, value in enumerate(labels, start=1):
        codes[values == value] = k
    return codes


# ----------------------------------------------------------------------------------------- dataset
class VolumeSliceDataset(Dataset):
    """Slices of volumes as 2D samples; `train` keeps only slices with foreground and augments them."""

    is_volumes = True

    def __init__(self, volumes: Sequence[Volume], class_names: Sequence[str], *, image_size: int, prompt: str,
                 n_points: int, n_neg_points: int, seed: int, window: Optional[tuple[float, float]],
                 train: bool = False, aug: str = "none", labels: Sequence[int] = ()):
        self.volumes = list(volumes)
        self._class_names = list(class_names)
        self.labels = list(labels)
        self.size, self.prompt, self.n_points, self.n_neg_points = image_size, prompt, n_points, n_neg_points
        self.seed, self.window, self.train = seed, window, train
        self.augment = transforms.build_augment(aug) if train else None
        self.epoch = 0
        self._index()

    def _index(self) -> None:
        self.index = [(v, k) for v, vol in enumerate(self.volumes) for k in range(vol.n_slices)
                      if not self.train or vol.present[k].any()]

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def names(self) -> list[str]:
        return [self.slice_name(v, k) for v, k in self.index]

    def slice_name(self, v: int, k: int) -> str:
        return f"{self.volumes[v].name}_{AXIS_LETTERS[self.volumes[v].axis]}{k:03d}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def truncate(self, limit: Optional[int]) -> None:
        """Training: the first N slices; evaluation: the first N volumes."""
        if limit is None:
            return
        if self.train:
            self.index = self.index[:limit]
        else:
            self.volumes = self.volumes[:limit]
            self._index()

    def slices_of(self, v: int) -> list[int]:
        """Dataset indices of volume v's slices, in slice order."""
        return [i for i, (w, _) in enumerate(self.index) if w == v]

    def __len__(self) -> int:
        return len(self.index)

    def load_image(self, index: int) -> np.ndarray:
        v, k = self.index[index]
        return np.repeat(self.volumes[v].image(k, self.window)[..., None], 3, axis=2)

    def __getitem__(self, index: int) -> dict:
        v, k = self.index[index]
        volume, name = self.volumes[v], self.slice_name(v, k)
        name_hash = zlib.crc32(name.encode())
        if self.train:
            seed = int(np.random.default_rng([self.seed, self.epoch, name_hash]).integers(2 ** 31 - 1))
        else:
            seed = None
        rng = np.random.default_rng(seed if self.train else [self.seed, name_hash])
        image = self.load_image(index)
        original_hw = image.shape[:2]
        classes = len(self._class_names)
        has_mask = volume.code_slices is not None
        code = volume.code(k) if has_mask else np.zeros(original_hw, np.uint8)
        mask = np.stack([code == c for c in range(1, classes + 1)], axis=2).astype(np.float32)
        image, mask = transforms.resize_longest(image, mask, self.size)
        if self.augment is not None:
            transforms.reseed(self.augment, seed)
            out = self.augment(image=image, mask=mask)
            image, mask = transforms.resize_longest(out["image"], out["mask"], self.size)
        valid_hw = image.shape[:2]
        soft = transforms.pad_to(mask, self.size).transpose(2, 0, 1)  # prompts see every resized foreground
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(transforms.pad_to(image, self.size).transpose(2, 0, 1),
                                                           dtype=np.float32)),
            "valid_hw": torch.tensor(valid_hw, dtype=torch.int64),
            "original_hw": torch.tensor(original_hw, dtype=torch.int64),
            "name": name,
            "image_path": volume.image_path,
            "present": torch.from_numpy(soft.reshape(classes, -1).max(1) > 0),
        }
        if has_mask:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(soft >= 0.5, dtype=np.float32))
        if self.prompt == "click":
            points, labels = click_prompts(soft, valid_hw, self.n_points, self.n_neg_points, rng, self.train)
            sample["points"], sample["point_labels"] = torch.from_numpy(points), torch.from_numpy(labels)
        elif self.prompt == "box":
            sample["boxes"] = torch.from_numpy(box_prompts(soft, valid_hw, rng, self.train))
        return sample


# ----------------------------------------------------------------------------------------- building
def split_by_volume(keys: Sequence[str], fraction: float, seed: int, where: str) -> dict[str, list[str]]:
    """Seeded train/val/test split of volume keys; val and test each get round(fraction x n), at least 1."""
    keys = sorted(keys)
    n = len(keys)
    if n < 3:
        raise UserError(f"{where} holds {n} volume pair(s): need at least 3 to split train/val/test by volume")
    hold = max(1, int(round(fraction * n)))
    hold = min(hold, (n - 1) // 2)
    order = np.random.default_rng(seed).permutation(n).tolist()
    test, val = set(order[:hold]), set(order[hold:2 * hold])
    return {"train": [k for i, k in enumerate(keys) if i not in test | val],
            "val": [k for i, k in enumerate(keys) if i in val], "test": [k for i, k in enumerate(keys) if i in test]}


def build_volumes(pairs: Sequence[tuple[Path, Path]], root: Path, axis: int,
                  labels: Optional[list[int]]) -> tuple[list[Volume], list[int]]:
    """Check shapes (headers), read every label volume, fix the label values; returns volumes with codes."""
    if axis not in (0, 1, 2):
        raise UserError(f"`slice_axis` must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis}")
    found, values = [], set()
    for image, label in pairs:
        image_shape, label_shape = volume_shape(image, "image"), volume_shape(label, "label")
        if image_shape != label_shape:
            raise UserError(f"image volume {image} is {'x'.join(map(str, image_shape))} but its label volume "
                            f"{label} is {'x'.join(map(str, label_shape))}: they must match voxel for voxel")
        label_values = read_label_values(label)
        values |= set(np.unique(label_values).tolist()) - {0}
        found.append((image, label, label_values))
    if labels is None:
        labels = sorted(values)
        if not labels:
            raise UserError(f"every label volume in {root} is empty (all 0): check the labels")
        if len(labels) > MAX_CLASSES:
            raise UserError(f"the label volumes in {root} hold {len(labels)} label values "
                            f"({', '.join(map(str, labels[:8]))}{' ...' if len(labels) > 8 else ''}) but the decoder "
                            f"gives at most {MAX_CLASSES} classes: pick them with `labels`, e.g. `labels` "
                            f"{','.join(map(str, labels[:MAX_CLASSES]))}")
    else:
        absent = [v for v in labels if v not in values]
        if absent:
            raise UserError(f"`labels` {','.join(map(str, labels))}: label {absent[0]} occurs in no label volume in "
                            f"{root} (values found: {', '.join(map(str, sorted(values))) or 'none'})")
    volumes = []
    for image, label, label_values in found:
        volume = Volume(name=nifti_stem(image), key=relative_key(image, root), image_path=str(image),
                        shape=tuple(label_values.shape), axis=axis, label_path=str(label))
        volume.set_codes(codes_from_labels(label_values, labels), len(labels))
        if not volume.present.any():
            raise UserError(f"label volume {label} has no foreground (labels {','.join(map(str, labels))}) in any "
                            f"slice: remove the volume or fix its labels (`labels`)")
        volumes.append(volume)
    return volumes, labels


def build_bundle(config: DataOptions, splits: Optional[dict] = None):
    """-dataset nifti -> DataBundle (datasets/__init__.py) of VolumeSliceDatasets, split by volume."""
    from . import DataBundle

    root = Path(config.data_path)
    image_dir, label_dir = find_layout(root)
    images, labels = list_volumes(image_dir), list_volumes(label_dir)
    if not images:
        raise UserError(f"{image_dir} holds no NIfTI volumes (.nii.gz, .nii): add volumes or fix `data_path`")
    pairs = pair_volumes(images, labels, image_dir, label_dir)
    volumes, values = build_volumes(pairs, root, config.slice_axis, parse_labels(config.labels))
    class_names = class_names_from_json(root, values)
    where = f"`data_path` {root}"
    sentence = f"NIfTI volumes {image_dir.name}/ + {label_dir.name}/ in {root}, slices along axis " \
               f"{config.slice_axis} (RAS), labels {','.join(map(str, values))}"
    by_key = {v.key: v for v in volumes}
    if splits is None:
        splits = split_by_volume(list(by_key), config.val_frac, config.seed, where)
        sentence += f"; split by volume: val and test {config.val_frac:g} each (seed {config.seed})"
    else:
        for split in ("train", "val", "test"):
            missing = [k for k in splits.get(split, []) if k not in by_key]
            if missing:
                raise UserError(f"{where} lacks {missing[0]} ({len(missing)} of the {split} volumes in the run's "
                                f"saved splits are missing): point `data_path` at the data the run used")
        sentence += "; splits reused from the run"
    window = parse_window(config.window)
    common = dict(image_size=config.image_size, prompt=config.prompt, n_points=config.n_points,
                  n_neg_points=config.n_neg_points, seed=config.seed, window=window, labels=values)
    built = {}
    for split in ("train", "val", "test"):
        chosen = [by_key[k] for k in splits.get(split) or []]
        if not chosen:
            built[split] = None
            continue
        ds = VolumeSliceDataset(chosen, class_names, train=split == "train", aug=config.aug, **common)
        ds.truncate(config.max_train if split == "train" else config.max_eval)
        built[split] = ds
    if built["train"] is None or built["val"] is None:
        raise UserError("the saved splits have an empty train or val list: use the run's own splits.json")
    saved = {split: [v.key for v in ds.volumes] for split, ds in built.items() if ds is not None}
    return DataBundle(train=built["train"], val=built["val"], test=built["test"], num_classes=len(values),
                      class_names=class_names, layout=sentence, splits=saved)


def build_prediction_volumes(folder: Path, prompt_from: Optional[Path], axis: int, labels: Sequence[int],
                             class_names: Sequence[str], **options) -> VolumeSliceDataset:
    """val.py -images DIR of volumes: every slice; prompts from -prompt_from label volumes (same names)."""
    images = list_volumes(folder)
    if not images:
        raise UserError(f"`images` {folder} holds no NIfTI volumes (.nii.gz, .nii): fix the path")
    prompt_volumes = {}
    if prompt_from is not None:
        if not Path(prompt_from).is_dir():
            raise UserError(f"`prompt_from` {prompt_from} is not a folder: give the folder of label volumes")
        prompt_volumes = dict(pair_volumes(images, list_volumes(Path(prompt_from)), folder, Path(prompt_from)))
    volumes = []
    for image in images:
        shape = volume_shape(image, "image")
        ras = ras_shape(image, shape)
        volume = Volume(name=nifti_stem(image), key=image.name, image_path=str(image), shape=ras, axis=axis)
        if image in prompt_volumes:
            label = prompt_volumes[image]
            if volume_shape(label, "label") != shape:
                raise UserError(f"image volume {image} is {'x'.join(map(str, shape))} but its `prompt_from` label "
                                f"volume {label} is {'x'.join(map(str, volume_shape(label, 'label')))}: they must "
                                f"match voxel for voxel")
            volume.label_path = str(label)
            volume.set_codes(codes_from_labels(read_label_values(label), labels), len(labels))
            if not volume.present.any():
                raise UserError(f"`prompt_from` label volume {label} has no foreground (labels "
                                f"{','.join(map(str, labels))}) in any slice: no prompt can be derived from it")
        volumes.append(volume)
    return VolumeSliceDataset(volumes, class_names, labels=labels, **options)


def ras_shape(path: Path, shape: Sequence[int]) -> tuple[int, int, int]:
    """The shape a file's 3D volume takes once reoriented to RAS (from the header's affine)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    ras_axis_of = [int(a) for a in ornt.io_orientation(nib.load(str(path)).affine)[:, 0]]
    return tuple(int(s) for s in np.asarray(shape)[np.argsort(ras_axis_of)])  # type: ignore[return-value]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
