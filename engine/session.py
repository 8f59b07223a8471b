"""Config -> the parts of a run: the adapted model, its datasets and its run folder."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cfg import Config, experiment_name
from datasets import DataBundle, build_datasets
from models import build_segmenter
from models.activation_checkpointing import enable_activation_checkpointing
from models.modes import Adaptation, apply_mode, parameter_table
from models.segmenter import PromptableSegmenter

from . import checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: Config, num_classes: int, total_steps: int, device: torch.device,
                verbose: bool = True) -> tuple[PromptableSegmenter, Adaptation]:
    """Base net (official weights or seeded random ones), adapted by -mod, on `device`.

    The random base is drawn right after seeding with config.seed, so val.py rebuilds the same one.
    """
    seed_everything(config.seed)
    model = build_segmenter(config.net, config.encoder, config.image_size, num_classes, checkpoint=config.sam_ckpt)
    if verbose:
        source = f"base weights from {config.sam_ckpt}" if config.sam_ckpt else \
            f"no -sam_ckpt: the base model starts from RANDOM weights (seed {config.seed})"
        print(f"{config.net} ({config.encoder}) at {config.image_size}px, {num_classes} class(es): {source}")
    adaptation = apply_mode(model, config, total_steps)
    if config.grad_ckpt:
        enable_activation_checkpointing(model)
    return model.to(device), adaptation


def format_parameter_table(model: torch.nn.Module, mode: str) -> str:
    lines = [f"trainable parameters ({mode}):", f"  {'part':<17}{'trainable':>13}{'total':>13}{'share':>9}"]
    for part, trainable, total in parameter_table(model):
        share = f"{100 * trainable / total:.2f}%" if total else "-"
        lines.append(f"  {part:<17}{trainable:>13,}{total:>13,}{share:>9}")
    return "\n".join(lines)


def run_folders(config: Config) -> tuple[Path, Path]:
    name = config.exp_name or experiment_name(config)
    return Path(config.ckpt_root) / name, Path(config.figs_root) / name


def load_data(config: Config, splits: Optional[dict] = None, verbose: bool = True) -> DataBundle:
    data = build_datasets(config, splits)
    if verbose:
        sizes = f"train {len(data.train)}, val {len(data.val)}" + (f", test {len(data.test)}" if data.test else "")
        print(f"dataset {config.dataset}: {data.layout}; {sizes}; classes {', '.join(data.class_names)}")
    return data


def write_run_config(run_dir: Path, config: Config, data: DataBundle, total_steps: int) -> None:
    run = {"num_classes": data.num_classes, "class_names": data.class_names, "total_steps": total_steps,
           "layout": data.layout}
    if getattr(data.train, "labels", None):  # -dataset nifti: the label value of each class
        run["labels"] = list(data.train.labels)
    checkpoints.write_json(run_dir / checkpoints.CONFIG, {**config.to_json(), "run": run})
    checkpoints.write_json(run_dir / checkpoints.SPLITS, data.splits)
