"""Config -> the parts of a run: the adapted model, its datasets and its run folder."""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from cfg import ZERO_SHOT, Config, experiment_name
from common.errors import UserError
from common.packages import data_module
from models import build_segmenter
from models.packaged import file_sha256
from models.registry import RANDOM, base_checkpoint
from models.activation_checkpointing import enable_activation_checkpointing, enable_mlp_recompute
from models.modes import apply_mode, get_mode
from models.modes.adaptation import Adaptation, parameter_table
from models.segmenter import PromptableSegmenter

from . import checkpoints

if TYPE_CHECKING:
    from datasets import DataBundle


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: Config, num_classes: int, total_steps: int, device: torch.device,
                verbose: bool = True) -> tuple[PromptableSegmenter, Adaptation]:
    """Base net (official weights or seeded random ones), adapted by -mod, on `device`.

    The random base is drawn right after seeding with config.seed, so val.py rebuilds the same one.
    """
    model = build_base(config, num_classes, verbose)
    if config.mod == ZERO_SHOT:
        model.requires_grad_(False)
        return model.to(device), Adaptation(ZERO_SHOT)
    adaptation = apply_mode(model, config.mod, total_steps, **mode_options(config))
    if config.grad_ckpt:
        enable_activation_checkpointing(model)
    if config.recompute_mlp:
        enable_mlp_recompute(model)
    return model.to(device), adaptation


def describe_base(config: Config, checkpoint: Optional[str]) -> str:
    if checkpoint is None:
        why = "-sam_ckpt random" if config.sam_ckpt == RANDOM else "no -sam_ckpt and no packaged weights"
        return f"{why}: the base model starts from RANDOM weights (seed {config.seed})"
    packaged = "packaged " if config.sam_ckpt is None else ""
    return f"{packaged}base weights from {checkpoint}"


def base_identity(config: Config) -> Optional[dict]:
    """Absolute path and sha256 of the base weights file a run starts from (None: random weights)."""
    checkpoint = base_checkpoint(config.net, config.encoder, config.sam_ckpt)
    if checkpoint is None:
        return None
    path = Path(checkpoint).resolve()
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist; pass the official weights file with -sam_ckpt")
    return {"path": str(path), "sha256": file_sha256(path)}


def check_base_identity(saved: Optional[dict], config: Config) -> None:
    """The base file a run folder was trained from must still be the same file (path and sha256)."""
    if saved is None:
        return
    current = base_identity(config)
    if current is None or current["sha256"] != saved["sha256"]:
        now = "random weights" if current is None else f"{current['path']} (sha256 {current['sha256'][:12]}...)"
        raise UserError(f"the run was trained from {saved['path']} (sha256 {saved['sha256'][:12]}...) but the base "
                        f"is now {now}: restore that file or pass it with -sam_ckpt")


def mode_options(config: Config) -> dict:
    """The options the run's mode declares, with their values in `config`."""
    return {name: getattr(config, name) for name in get_mode(config.mod).options}


def build_base(config: Config, num_classes: int, verbose: bool = False) -> PromptableSegmenter:
    """The base net alone (no mode applied, on the CPU): what `build_model` adapts."""
    seed_everything(config.seed)
    checkpoint = base_checkpoint(config.net, config.encoder, config.sam_ckpt)
    model = build_segmenter(config.net, config.encoder, config.image_size, num_classes, checkpoint=checkpoint)
    if verbose:
        print(f"{config.net} ({config.encoder}) at {config.image_size}px, {num_classes} class(es): "
              f"{describe_base(config, checkpoint)}")
    return model


def format_parameter_table(model: torch.nn.Module, mode: str, updated: Optional[dict[str, int]] = None) -> str:
    """The trainable-parameter table; with `updated` (per part, from the first real step: elements whose
    gradient is non-zero) an `updated` column tells the parameters that train from those that merely could."""
    extra = f"{'updated':>13}" if updated is not None else ""
    lines = [f"trainable parameters ({mode}){' and those the first two steps updated' if extra else ''}:",
             f"  {'part':<17}{'trainable':>13}{extra}{'total':>13}{'share':>9}"]
    for part, trainable, total in parameter_table(model, get_mode(mode).adapter_prefix):
        share = f"{100 * trainable / total:.2f}%" if total else "-"
        if updated is not None:
            count = sum(updated.values()) if part == "all" else updated.get(part, 0)
            extra = f"{count:>13,}"
        lines.append(f"  {part:<17}{trainable:>13,}{extra}{total:>13,}{share:>9}")
    return "\n".join(lines)


def run_folders(config: Config) -> tuple[Path, Path]:
    name = config.exp_name or experiment_name(config)
    return Path(config.ckpt_root) / name, Path(config.figs_root) / name


def load_data(config: Config, splits: Optional[dict] = None, verbose: bool = True) -> DataBundle:
    # the data package, `datasets` or `medsam_peft.datasets` (common/packages.py), imported here: OpenCV and
    # the image pipeline stay out of processes that build no dataset (benchmark.py's rows)
    package = data_module()
    data = package.build_datasets(package.DataOptions.pick(config), splits)
    if verbose:
        sizes = f"train {len(data.train)}, val {len(data.val)}" + (f", test {len(data.test)}" if data.test else "")
        print(f"dataset {config.dataset}: {data.layout}; {sizes}; classes {', '.join(data.class_names)}")
    return data


def write_run_config(run_dir: Path, config: Config, data: DataBundle, total_steps: int) -> None:
    run = {"num_classes": data.num_classes, "class_names": data.class_names, "total_steps": total_steps,
           "layout": data.layout, "base": base_identity(config)}
    if getattr(data.train, "labels", None):  # -dataset nifti: the label value of each class
        run["labels"] = list(data.train.labels)
    checkpoints.write_json(run_dir / checkpoints.CONFIG, {**config.to_json(), "run": run})
    checkpoints.write_json(run_dir / checkpoints.SPLITS, data.splits)
