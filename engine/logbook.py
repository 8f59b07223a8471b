"""Per-epoch records: metrics.csv (the source of truth), TensorBoard scalars/images, curve figures."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from .checkpoints import atomic_write


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is made: a process that
    makes none (benchmark.py's rows, a training step) does not hold its 26 MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """Rewrite the whole CSV from the history kept in last.pt, so a resumed run never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss, Dice and IoU per epoch (validation metrics only on epochs that validated)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [row["epoch"] for row in history]
    axes[0].plot(epochs, [row["train_loss"] for row in history], marker="o")
    axes[0].set_title("train loss")
    for ax, metric in zip(axes[1:], ("dice", "iou")):
        keys = [k for k in history[-1] if k.startswith(f"val_{metric}_")]
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) not in (None, "")]
            if points:
                ax.plot(*zip(*points), marker="o", label=key.removeprefix(f"val_{metric}_"),
                        linewidth=2.5 if key.endswith("_mean") else 1.2)
        ax.set_title(f"val {metric}" if keys else f"val {metric} (-val_freq 0: not validated)")
        ax.set_ylim(0, 1)
        if keys:
            ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def tensorboard_tag(key: str) -> str:
    """metrics.csv column -> grouped TensorBoard tag (val/dice_mean, train/loss, train/lr, run/peak_mem_mb)."""
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("train_"):
        return f"train/{key[6:]}"
    return "train/lr" if key == "lr" else f"run/{key}"


def format_number(value) -> str:
    """Meaningful precision for the console: counts as integers, 1e-05 not 0.0000, metrics to 4 decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):d}"
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e6:
        return f"{value:.3g}"
    return f"{value:.4f}"


class TensorBoardLog:
    """Scalars and overlay images per epoch; a no-op object on non-main processes."""

    def __init__(self, folder: Optional[Path]):
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(folder))

    def scalars(self, row: dict, step: int) -> None:
        """One epoch's row, tags grouped: val_* -> val/*, train_loss and lr -> train/*, the rest -> run/*."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(tensorboard_tag(key), value, step)
        self.writer.flush()

    def step_scalars(self, values: dict, step: int) -> None:
        """Per-step values (train/loss_step, train/lr_step) at the global step; flushed with the epoch."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png_path: Path, step: int) -> None:
        if self.writer is None:
            return
        image = pyplot().imread(png_path)[..., :3]
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
