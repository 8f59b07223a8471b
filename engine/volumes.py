"""Volumes (-dataset nifti): predict every slice, stack back, 3D Dice/IoU per volume, write .nii.gz labels.

Per slice the net's C class logits are mapped back to the slice's original in-plane size (crop the
padding, bilinear), and each voxel takes the class with the highest logit among those > 0 (labels are
exclusive in a label volume), else background.

Prompted runs (-prompt box / click) follow the usual interactive protocol: a slice gets a prompt for a
class only where the prompt source (the ground-truth label volume in evaluation, the -prompt_from
volume in prediction) holds that class; elsewhere the class is predicted empty (no prompt, no mask),
and slices holding no class are not run through the net at all. With -prompt none every slice of
every volume is predicted freely.

3D Dice and IoU are computed per class over the whole volume (in RAS voxel order, which does not
change them); a class empty in both prediction and ground truth scores 1 (as for 2D images). The
summary is the mean over volumes per class, then over classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate

from common.packages import data_module
from common.progress import progress

VolumeSliceDataset, ras_to_file_orientation = (data_module("nifti").VolumeSliceDataset,
                                                 data_module("nifti").ras_to_file_orientation)


def dice_iou_3d(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-code volumes (0 background, k class k) -> per-class Dice and IoU (C,)."""
    dice, iou = np.ones(num_classes), np.ones(num_classes)
    for c in range(num_classes):
        p, t = pred == c + 1, truth == c + 1
        inter, total = np.count_nonzero(p & t), np.count_nonzero(p) + np.count_nonzero(t)
        if total:
            dice[c] = 2 * inter / total
            iou[c] = inter / (total - inter)
    return dice, iou


def slice_codes(logits: torch.Tensor, valid_hw, original_hw, present: Optional[torch.Tensor]) -> np.ndarray:
    """C x S x S logits of one slice -> H x W uint8 class codes at the slice's original size."""
    height, width = int(valid_hw[0]), int(valid_hw[1])
    full = F.interpolate(logits[None, :, :height, :width].float(), size=(int(original_hw[0]), int(original_hw[1])),
                         mode="bilinear", align_corners=False)[0]
    if present is not None:  # no prompt for a class: predicted empty
        full[~present.to(full.device)] = -torch.inf
    best, index = full.max(dim=0)
    return torch.where(best > 0, index + 1, 0).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def predict_volume(model, dataset: VolumeSliceDataset, v: int, batch_size: int, amp: str,
                   device: torch.device) -> np.ndarray:
    """Class-code volume (RAS, the volume's shape) for volume v of the dataset."""
    from .trainer import predict_logits

    volume = dataset.volumes[v]
    codes = np.zeros(volume.shape, np.uint8)
    view = np.moveaxis(codes, volume.axis, 0)
    prompted = dataset.prompt != "none"
    indices = dataset.slices_of(v)
    if prompted and volume.present is not None:  # slices without any prompt stay background
        indices = [i for i in indices if volume.present[dataset.index[i][1]].any()]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = default_collate([dataset[i] for i in chunk])
        logits = predict_logits(model, batch, device, amp, dataset.size)
        for row, i in enumerate(chunk):
            present = batch["present"][row] if prompted else None
            view[dataset.index[i][1]] = slice_codes(logits[row], batch["valid_hw"][row], batch["original_hw"][row],
                                                    present)
    return codes


def write_label_volume(codes: np.ndarray, dataset: VolumeSliceDataset, v: int, out_dir: Path) -> Path:
    """Write <volume>.nii.gz: the chosen label values, in the input's voxel order, shape, affine and header."""
    import nibabel as nib

    volume = dataset.volumes[v]
    source = nib.load(volume.image_path)
    values = np.zeros(codes.shape, np.int32)
    for k, label in enumerate(dataset.labels, start=1):
        values[codes == k] = label
    values = ras_to_file_orientation(values, source.affine).reshape(source.shape)
    dtype = np.uint8 if max(dataset.labels, default=0) < 256 else np.int16
    header = source.header.copy()
    header.set_data_dtype(dtype)
    image = type(source)(values.astype(dtype), source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{volume.name}.nii.gz"
    nib.save(image, str(path))
    return path


@torch.no_grad()
def evaluate_volumes(model, dataset: VolumeSliceDataset, settings, runtime, class_names: list[str],
                     desc: str = "eval", out_dir: Optional[Path] = None) -> tuple[dict, list[dict]]:
    """Per-volume 3D Dice/IoU per class -> (summary: mean over volumes, then classes; per-volume rows).

    `settings`: engine.evaluation.EvalSettings (batch size, amp). Volumes are dealt over the processes
    (volume i to rank i mod world) and the table summed."""
    was_training = model.training
    model.eval()
    classes = len(class_names)
    table = torch.zeros(len(dataset.volumes), 2, classes, dtype=torch.float64)
    mine = [v for v in range(len(dataset.volumes)) if v % runtime.world_size == runtime.rank]
    for v in progress(mine, desc=desc, disable=not runtime.is_main):
        codes = predict_volume(model, dataset, v, settings.batch_size, settings.amp, runtime.device)
        dice, iou = dice_iou_3d(codes, dataset.volumes[v].code_volume(), classes)
        table[v, 0], table[v, 1] = torch.from_numpy(dice), torch.from_numpy(iou)
        if out_dir is not None:
            write_label_volume(codes, dataset, v, Path(out_dir))
    if runtime.distributed:
        flat = table.to(runtime.device)
        dist.all_reduce(flat)
        table = flat.cpu()
    model.train(was_training)
    rows = []
    for v, volume in enumerate(dataset.volumes):
        row = {"volume": volume.name}
        for m, metric in enumerate(("dice", "iou")):
            row.update({f"{metric}_{name}": float(table[v, m, c]) for c, name in enumerate(class_names)})
            row[f"{metric}_mean"] = float(table[v, m].mean())
        rows.append(row)
    summary = {}
    for m, metric in enumerate(("dice", "iou")):
        per_class = table[:, m].mean(0)
        summary.update({f"{metric}_{name}": float(per_class[c]) for c, name in enumerate(class_names)})
        summary[f"{metric}_mean"] = float(per_class.mean())
    summary["images"] = float(len(dataset.volumes))  # volumes, under the key the 2D summary uses
    return summary, rows


@torch.no_grad()
def predict_volumes(model, dataset: VolumeSliceDataset, config, device: torch.device, out_dir: Path) -> list[Path]:
    """val.py -images DIR of volumes: write every volume's predicted labels; returns the written files."""
    model.eval()
    written = []
    for v in progress(range(len(dataset.volumes)), desc="predict"):
        codes = predict_volume(model, dataset, v, config.b, config.amp, device)
        written.append(write_label_volume(codes, dataset, v, Path(out_dir)))
    return written


def format_volume_table(rows: list[dict], summary: dict) -> str:
    """Per-volume rows and the mean over volumes, as aligned text."""
    keys = [k for k in rows[0] if k != "volume"] if rows else []
    width = max([len("mean")] + [len(r["volume"]) for r in rows]) + 2
    lines = [f"  {'volume':<{width}}" + "".join(f"{k:>14}" for k in keys)]
    for row in rows:
        lines.append(f"  {row['volume']:<{width}}" + "".join(f"{row[k]:>14.4f}" for k in keys))
    lines.append(f"  {'mean':<{width}}" + "".join(f"{summary[k]:>14.4f}" for k in keys))
    return "\n".join(lines)
