"""The run folder: config.json, splits.json, {best,last}.safetensors (only what the run changed),
last.pt (everything needed to resume). Every write is atomic: write a temporary file, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.errors import UserError
from models.state_dicts import key_differences

CONFIG, SPLITS, LAST_STATE = "config.json", "splits.json", "last.pt"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename onto `path`: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        # mkstemp makes 0600 (and some writers recreate the file): give it the usual mode, 0666 & ~umask,
        # so that other users of a shared cluster can read the run's files
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))


def changed_tensors(model: nn.Module, full: bool) -> dict[str, Tensor]:
    """What a run changes: every tensor for full fine-tuning, else the trainable parameters only."""
    if full:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def save_weights(path: Path, model: nn.Module, full: bool, metadata: dict[str, str]) -> None:
    tensors = changed_tensors(model, full)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path: Path, model: nn.Module, full: bool) -> None:
    """Load a run's weights into an identically built and adapted model; every tensor must fit."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; the run folder has no such weights (train it first)")
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise UserError(f"{path} is not a readable safetensors file ({error})") from None
    problems = key_differences(changed_tensors(model, full), tensors)
    if problems:
        raise UserError(f"{path} does not fit the model described by its config.json: {'; '.join(problems)}")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)


def save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: -resume needs a run folder that has written last.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_run_config(folder: str) -> dict:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise UserError(f"-weights {folder} is not a folder; pass checkpoint/<exp_name>")
    if not path.is_file():
        raise UserError(f"{path} is missing: -weights must be a run folder written by train.py")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}); the run folder is damaged") from None


def load_splits(folder: str) -> dict:
    path = Path(folder) / SPLITS
    if not path.is_file():
        raise UserError(f"{path} is missing: the run folder was not written by train.py")
    return json.loads(path.read_text())
