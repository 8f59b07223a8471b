"""Evaluation and the prediction helpers shared by training, val.py and the benchmark: autocast policy,
logits at the metric resolution, and Dice/IoU over a dataset summed across processes."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common.errors import UserError
from common.progress import progress
from models.segmenter import PromptableSegmenter, Prompts

from .amp import resolve_amp
from .metrics import MetricAccumulator, valid_region
from .runtime import Runtime
from .sampler import ShardSampler


def prompts_from_batch(batch: dict, device: torch.device) -> Prompts:
    """The prompts a dataset batch carries (click points, boxes, or none)."""
    return Prompts(points=batch.get("points"), point_labels=batch.get("point_labels"),
                   boxes=batch.get("boxes")).to(device)


def autocast_context(amp: str, device: torch.device):
    """Autocast for -amp none|bf16|fp16|auto (auto: engine/amp.py's choice for `device`)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("-amp fp16 needs CUDA; use -amp bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def predict_logits(model: nn.Module, batch: dict, device: torch.device, amp: str, size: int,
                   embeddings: Optional[Tensor] = None) -> Tensor:
    """Float32 logits at size x size for a batch (images 0..255, S x S), or from cached embeddings."""
    images = None if embeddings is not None else batch["image"].to(device, non_blocking=True)
    with autocast_context(amp, device):
        logits, _ = model(images, prompts_from_batch(batch, device), embeddings=embeddings,
                          valid_hw=batch["valid_hw"].to(device))
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


def resize_target(mask: Tensor, size: int) -> Tensor:
    if mask.shape[-1] == size:
        return mask
    return F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False)


def logits_at_original_size(logits: Tensor, valid_hw: Tensor, original_hw: Tensor) -> Tensor:
    """C x S x S logits of one image -> C x H x W float logits at its original size: crop the padding, resize
    bilinearly (the official SAM / LiteMedSAM post-processing; threshold at 0 for masks)."""
    height, width = int(valid_hw[0]), int(valid_hw[1])
    cropped = logits[:, :height, :width][None].float()
    return F.interpolate(cropped, size=(int(original_hw[0]), int(original_hw[1])), mode="bilinear",
                         align_corners=False)[0]


@dataclass(frozen=True)
class EvalSettings:
    """What evaluation reads of a run: batch size, DataLoader workers, autocast (none | bf16 | fp16), the
    model's input size S and the size logits are scored at for validation (None: S)."""

    batch_size: int
    workers: int
    amp: str
    image_size: int
    out_size: Optional[int] = None

    @classmethod
    def of(cls, config) -> "EvalSettings":
        """The settings of a run's Config (-b, -workers, -amp, -image_size, -out_size)."""
        return cls(config.b, config.workers, config.amp, config.image_size, config.out_size)


@torch.no_grad()
def evaluate(model: PromptableSegmenter, dataset: Dataset, settings: EvalSettings, runtime: Runtime,
             class_names: list[str], desc: str = "eval", original: bool = False,
             per_image: Optional[list] = None) -> dict[str, float]:
    """Dice/IoU per class (and vCDR error for disc+cup) over `dataset`, summed over all processes.

    original=False: at the model's resolution (-out_size, default -image_size) against the resized masks
    (per-epoch validation); original=True: predictions resized to each image's original size against its
    original mask (what val.py and the final test evaluation report; a dataset without original masks
    is evaluated at the model's resolution). Volume data sets (-dataset nifti) give per-volume 3D
    Dice/IoU at the volume's own size, averaged over volumes (engine/volumes.py).

    per_image (original=True): a list that gets one row per image, {"image": name, "dice_<class>": ...,
    "iou_<class>": ...}, in dataset order and from every process, for paired comparisons of two runs."""
    if per_image is not None and not original:
        raise ValueError("per-image rows are recorded only for the original-resolution evaluation")
    if getattr(dataset, "is_volumes", False):
        from .volumes import evaluate_volumes
        return evaluate_volumes(model, dataset, settings, runtime, class_names, desc)[0]
    original = original and hasattr(dataset, "original_mask")
    was_training = model.training
    model.eval()
    size = settings.image_size if original else settings.out_size or settings.image_size
    loader = DataLoader(IndexedDataset(dataset) if original else dataset, batch_size=settings.batch_size,
                        sampler=ShardSampler(len(dataset), runtime.rank, runtime.world_size),
                        num_workers=settings.workers, pin_memory=runtime.device.type == "cuda")
    metrics = MetricAccumulator(class_names)
    names, rows = (dataset.names, []) if per_image is not None and original else (None, None)
    for batch in progress(loader, desc=desc, disable=not runtime.is_main):
        logits = predict_logits(model, batch, runtime.device, settings.amp, size)
        if not original:
            target = resize_target(batch["mask"].to(runtime.device), size)
            metrics.update(logits, target, valid_region(batch["valid_hw"].to(runtime.device), size,
                                                        settings.image_size))
            continue
        for i, index in enumerate(batch["index"].tolist()):
            full = logits_at_original_size(logits[i], batch["valid_hw"][i], batch["original_hw"][i])[None]
            target = torch.from_numpy(dataset.original_mask(index))[None].to(full.device)
            dice, iou = metrics.update(full, target, torch.ones_like(target[:, :1], dtype=torch.bool))
            if rows is not None:
                rows.append((index, image_row(names[index], class_names, dice[0], iou[0])))
    if runtime.distributed:
        flat = metrics.state_tensor().to(runtime.device)
        dist.all_reduce(flat)
        metrics.load_state_tensor(flat.cpu())
        if rows is not None:
            gathered = [None] * runtime.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
    if rows is not None:
        per_image.extend(row for _, row in sorted(rows, key=lambda pair: pair[0]))
    model.train(was_training)
    return metrics.summary()


def image_row(name: str, class_names: list[str], dice: Tensor, iou: Tensor) -> dict:
    """One image's scores: {"image": name, "dice_<class>": ..., "iou_<class>": ...}."""
    row: dict = {"image": name}
    for metric, values in (("dice", dice), ("iou", iou)):
        row.update({f"{metric}_{cls}": value for cls, value in zip(class_names, values.tolist())})
    return row


class IndexedDataset(Dataset):
    """Adds each sample's index (the key of the embedding cache and of the original masks)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}
