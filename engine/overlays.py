"""Figures of samples: image, ground-truth and predicted contours per class, and the prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CLASS_COLOURS = ("#00e5ff", "#ffd400", "#ff4dd2")  # ground truth per class: cyan, yellow, magenta
PRED_COLOURS = ("#ff6a00", "#ff1f1f", "#b84dff")  # predictions per class: orange, red, violet
LABEL_STYLE = {1: dict(marker="*", color="#00ff3c", s=90), 0: dict(marker="X", color="#ff2020", s=60)}


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _unbatch(samples) -> list[dict]:
    """A list of sample dicts, or one collated batch dict -> list of sample dicts."""
    if isinstance(samples, dict):
        count = len(samples["image"])
        return [{k: v[i] for k, v in samples.items()} for i in range(count)]
    return list(samples)


def _to_frame(prediction, size: int) -> np.ndarray:
    """C x s x s prediction (bool, probabilities) -> C x S x S float in the model-input frame."""
    pred = torch.as_tensor(_numpy(prediction)).float()
    if pred.dim() == 2:
        pred = pred[None]
    if pred.shape[-1] != size:
        pred = F.interpolate(pred[None], size=(size, size), mode="nearest")[0]
    return pred.numpy()


def _contours(ax, masks: np.ndarray, height: int, width: int, dashed: bool) -> None:
    palette = PRED_COLOURS if dashed else CLASS_COLOURS
    for c, mask in enumerate(masks):
        region = mask[:height, :width]
        if region.max() >= 0.5 and region.min() < 0.5:
            ax.contour(region, levels=[0.5], colors=[palette[c % len(palette)]],
                       linewidths=1.2 if dashed else 1.6, linestyles="dashed" if dashed else "solid")


def _prompts(ax, sample: dict) -> None:
    if "boxes" in sample:
        for c, (x0, y0, x1, y1) in enumerate(_numpy(sample["boxes"]).reshape(-1, 4)):
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=1.0,
                                       edgecolor=CLASS_COLOURS[c % len(CLASS_COLOURS)], linestyle=":"))
    if "points" in sample:
        points = _numpy(sample["points"]).reshape(-1, 2)
        labels = _numpy(sample["point_labels"]).reshape(-1).astype(int)
        for label, style in LABEL_STYLE.items():
            chosen = points[labels == label]
            if len(chosen):
                ax.scatter(chosen[:, 0], chosen[:, 1], edgecolors="black", linewidths=0.6, **style)


def save_overlay_grid(samples: Sequence[dict] | dict, path, predictions: Optional[Sequence] = None,
                      title: Optional[str] = None, columns: int = 4) -> Path:
    """Write a grid with one panel per sample and return the path.

    Each panel shows the un-padded image region, ground-truth contours per class (solid; cyan, yellow,
    magenta), predicted contours (dashed; orange, red, violet; `predictions[i]` is C x s x s, bool or
    probabilities thresholded at 0.5, any size s, resized to the S x S frame), boxes (dotted, class
    colour) and clicks (green star foreground, red cross background; padding points are not drawn).
    `samples` is a list of sample dicts or one collated batch.
    """
    samples = _unbatch(samples)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(1, len(samples))
    cols = min(columns, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, sample in enumerate(samples):
        ax = axes.flat[i]
        image = _numpy(sample["image"])
        size = image.shape[-1]
        height, width = (int(v) for v in _numpy(sample.get("valid_hw", (size, size))))
        ax.imshow(np.clip(image.transpose(1, 2, 0)[:height, :width], 0, 255).astype(np.uint8),
                  extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        if "mask" in sample:
            _contours(ax, _numpy(sample["mask"]), height, width, dashed=False)
        if predictions is not None and i < len(predictions) and predictions[i] is not None:
            _contours(ax, _to_frame(predictions[i], size), height, width, dashed=True)
        _prompts(ax, sample)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(str(sample.get("name", i))[:32], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    legend = "solid: ground truth" + ("   dashed: prediction" if predictions is not None else "") + \
        "   star: foreground click   cross: background click   dotted: box"
    fig.text(0.5, 0.005, legend, ha="center", va="bottom", fontsize=7, color="#444444")
    fig.tight_layout(rect=(0, 0.025, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
