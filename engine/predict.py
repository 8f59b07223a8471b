"""Predicted masks written back at the original image size, with overlays."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cfg import Config
from common.progress import progress

from .evaluation import logits_at_original_size, predict_logits

CLASS_COLOURS = ((255, 64, 64), (64, 160, 255), (80, 220, 80))  # RGB per class


def overlay(image_rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Blend each class mask in its colour and outline it."""
    out = image_rgb.astype(np.float32)
    for mask, colour in zip(masks, CLASS_COLOURS):
        out[mask] = 0.6 * out[mask] + 0.4 * np.array(colour, dtype=np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    for mask, colour in zip(masks, CLASS_COLOURS):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 2)
    return out


@torch.no_grad()
def save_predictions(model: torch.nn.Module, dataset: Dataset, config: Config, device: torch.device,
                     out_dir: Path, class_names: list[str]) -> int:
    """Write <name>.png (binary) or <name>_<class>.png (several classes), 0/255 at the original size,
    and <name>_overlay.png; returns the number of images written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    loader = DataLoader(dataset, batch_size=config.b, num_workers=config.workers)
    index = 0
    for batch in progress(loader, desc="predict"):
        logits = predict_logits(model, batch, device, config.amp, config.image_size)
        for i, name in enumerate(batch["name"]):
            masks = (logits_at_original_size(logits[i], batch["valid_hw"][i], batch["original_hw"][i]) > 0).cpu().numpy()
            write_prediction(out_dir, name, dataset.load_image(index), masks, class_names)
            index += 1
    return index


def write_prediction(out_dir: Path, name: str, image: np.ndarray, masks: np.ndarray, class_names: list[str]) -> None:
    """<name>.png (one class) or <name>_<class>.png, 0/255, and <name>_overlay.png over the original image."""
    for mask, class_name in zip(masks, class_names):
        suffix = "" if len(class_names) == 1 else f"_{class_name}"
        cv2.imwrite(str(out_dir / f"{name}{suffix}.png"), mask.astype(np.uint8) * 255)
    cv2.imwrite(str(out_dir / f"{name}_overlay.png"), cv2.cvtColor(overlay(image, masks), cv2.COLOR_RGB2BGR))


def predict_folder(predictor, dataset, out_dir: Path) -> int:
    """val.py -images: every image of an ImageFolderDataset through the Python API (engine/predictor.py),
    with its -boxes box when given; writes what `save_predictions` writes and returns the image count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in progress(range(len(dataset)), desc="predict"):
        image, name = dataset.load_image(index), dataset.paths[index].stem
        predictor.set_image(image)
        box = dataset.boxes[name] if dataset.boxes is not None else None
        masks, _ = predictor.predict(box=box)
        write_prediction(out_dir, name, image, masks, predictor.class_names)
    return len(dataset)
