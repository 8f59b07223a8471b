"""A fine-tuned (or base) net from Python, the way segment-anything's SamPredictor works:

    from engine.predictor import Predictor
    predictor = Predictor.from_run("checkpoint/<exp_name>")      # or Predictor.from_base("lite_medsam")
    predictor.set_image(image)                                  # H x W x 3 uint8 RGB (H x W grey works too)
    masks, scores = predictor.predict(box=[x0, y0, x1, y1])     # C x H x W bool, C predicted IoUs
    # points=[[x, y], ...], labels=[1, 0, ...] (1 foreground, 0 background); no prompt: predict()

Prompts and masks are in ORIGINAL image pixels: the image is resized (longest side S) and padded exactly as
the data sets do, prompts are mapped into that frame, and masks are cropped and resized back.
`val.py -images` predicts through this class, so the CLI and the API give the same masks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.packages import data_module
from models.segmenter import PromptableSegmenter, Prompts

from .evaluation import autocast_context, logits_at_original_size

ArrayLike = Union[np.ndarray, Sequence, Tensor]


class Predictor:
    """Encode one image once (`set_image`), then decode any number of prompts (`predict`)."""

    def __init__(self, model: PromptableSegmenter, image_size: int, device: Optional[torch.device] = None,
                 class_names: Optional[list[str]] = None, amp: str = "auto"):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.class_names = class_names or [f"class{c}" for c in range(model.num_classes)]
        self.amp = amp
        self.embeddings: Optional[Tensor] = None
        self.original_hw: tuple[int, int] = (0, 0)
        self.valid_hw: tuple[int, int] = (0, 0)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_run(cls, run_dir: Union[str, Path], which: str = "best", device: str = "auto") -> "Predictor":
        """A run folder written by train.py (config.json + {best,last}.safetensors), rebuilt as val.py does."""
        from cfg import Config

        from . import checkpoints
        from .runtime import resolve_device
        from .session import build_model, check_base_identity
        from models.modes import get_mode

        saved = checkpoints.read_run_config(str(run_dir))
        run = saved.get("run", {})
        config = Config.from_json(saved)
        if run.get("base"):
            config = dataclasses.replace(config, sam_ckpt=run["base"]["path"])
        check_base_identity(run.get("base"), config)
        torch_device = resolve_device(device)
        model, _ = build_model(config, run["num_classes"], run["total_steps"], torch_device, verbose=False)
        checkpoints.load_weights(Path(run_dir) / f"{which}.safetensors", model, get_mode(config.mod).saves_all)
        return cls(model, config.image_size, torch_device, run["class_names"], config.amp)

    @classmethod
    def from_base(cls, net: str = "lite_medsam", encoder: str = "default", image_size: Optional[int] = None,
                  checkpoint: Optional[str] = None, device: str = "auto", num_classes: int = 1) -> "Predictor":
        """The base net zero-shot (packaged weights by default; `checkpoint` an official file or "random")."""
        from cfg import Config

        from .runtime import resolve_device
        from .session import build_base

        size = image_size or (256 if net == "lite_medsam" else 1024)
        config = Config(net=net, encoder=encoder, image_size=size, sam_ckpt=checkpoint)
        model = build_base(config, num_classes).requires_grad_(False)
        return cls(model, size, resolve_device(device))

    # ----------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """H x W x 3 RGB (or H x W grey) image, values 0..255; computes and keeps its embeddings."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"set_image takes an H x W x 3 RGB image, got shape {image.shape}")
        self.original_hw = image.shape[:2]
        resized, _ = data_module("transforms").resize_longest(image, None, self.image_size)
        self.valid_hw = resized.shape[:2]
        padded = data_module("transforms").pad_to(resized, self.image_size)
        tensor = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32))[None]
        with autocast_context(self.amp, self.device):
            self.embeddings = self.model.encode(tensor.to(self.device),
                                                torch.tensor([self.valid_hw], device=self.device))

    def _scale(self) -> np.ndarray:
        """x, y factors from original pixels to the model frame."""
        return np.array([self.valid_hw[1] / self.original_hw[1], self.valid_hw[0] / self.original_hw[0]], np.float32)

    def to_model_box(self, box: ArrayLike) -> np.ndarray:
        """x0, y0, x1, y1 in original pixels -> the model frame, clamped to the valid area (as -boxes does)."""
        box = np.asarray(box, np.float32).reshape(-1, 4) * np.tile(self._scale(), 2)
        high = np.array([self.valid_hw[1] - 1, self.valid_hw[0] - 1] * 2, np.float32)
        return np.clip(box, 0, high).astype(np.float32)

    @torch.no_grad()
    def predict(self, box: Optional[ArrayLike] = None, points: Optional[ArrayLike] = None,
                labels: Optional[ArrayLike] = None, return_logits: bool = False):
        """Masks for every class of the net: (C x H x W bool masks, C predicted IoUs) at the original size;
        with return_logits also the C x S x S logits of the model frame.

        box: x0, y0, x1, y1 (every class gets it) or C x 4 (one per class); points: N x 2 (x, y) or C x N x 2;
        labels: N (1 foreground, 0 background; default all 1) or C x N. All in original image pixels."""
        if self.embeddings is None:
            raise RuntimeError("call set_image(image) before predict()")
        classes = self.model.num_classes
        prompts = Prompts()
        if box is not None:
            boxes = self.to_model_box(box)
            boxes = np.repeat(boxes, classes, axis=0) if len(boxes) == 1 else boxes
            prompts.boxes = torch.from_numpy(boxes).view(1, classes, 4)
        if points is not None:
            coords = np.asarray(points, np.float32)
            coords = coords.reshape(-1, coords.shape[-2], 2) * self._scale()
            marks = np.ones(coords.shape[:2], np.float32) if labels is None else \
                np.asarray(labels, np.float32).reshape(-1, coords.shape[1])
            if len(coords) == 1:
                coords, marks = np.repeat(coords, classes, axis=0), np.repeat(marks, classes, axis=0)
            prompts.points = torch.from_numpy(coords).view(1, classes, -1, 2)
            prompts.point_labels = torch.from_numpy(marks).view(1, classes, -1)
        with autocast_context(self.amp, self.device):
            logits, iou = self.model(None, prompts.to(self.device), embeddings=self.embeddings,
                                     valid_hw=torch.tensor([self.valid_hw], device=self.device))
        logits = F.interpolate(logits.float(), size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False)[0]
        masks = (logits_at_original_size(logits, torch.tensor(self.valid_hw), torch.tensor(self.original_hw)) > 0).cpu().numpy()
        scores = iou[0].float().cpu().numpy()
        return (masks, scores, logits.cpu()) if return_logits else (masks, scores)
