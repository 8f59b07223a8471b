"""Net registry: (net, encoder) -> builder plus the official checkpoint format it loads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from common.errors import UserError

from .packaged import PackagedCheckpoint
from .segmenter import AdaptTargets, PromptableSegmenter
from .state_dicts import key_differences

StateDict = dict[str, Tensor]
Builder = Callable[..., PromptableSegmenter]  # (image_size, num_classes, **arch_overrides)
CheckpointFilter = Callable[[StateDict, nn.Module], StateDict]


@dataclass(frozen=True)
class NetEntry:
    net: str
    encoder: str
    build: Builder
    checkpoint_filter: Optional[CheckpointFilter]
    checkpoint_format: str
    unwrap_key: Optional[str]  # the official file holds its state_dict under this key (None: flat)
    size_multiple: int
    adapt_targets: Optional[AdaptTargets] = None  # where the modes act in its encoder (-lora_conv needs convs)
    packaged: Optional[PackagedCheckpoint] = None  # pretrained weights installed with a package: the default base


_NETS: dict[tuple[str, str], NetEntry] = {}
_DEFAULT_ENCODER: dict[str, str] = {}


def register_net(net: str, encoder: str, build: Builder, *, checkpoint_format: str,
                 checkpoint_filter: Optional[CheckpointFilter] = None, unwrap_key: Optional[str] = None,
                 size_multiple: int = 16, default: bool = False,
                 adapt_targets: Optional[AdaptTargets] = None, packaged: Optional[PackagedCheckpoint] = None) -> None:
    _NETS[(net, encoder)] = NetEntry(net, encoder, build, checkpoint_filter, checkpoint_format, unwrap_key,
                                     size_multiple, adapt_targets, packaged)
    if default:
        _DEFAULT_ENCODER[net] = encoder


def load_nets() -> None:
    """Import the net modules (each registers its nets on import); cheap after the first call."""
    import importlib

    from . import NET_MODULES

    for module in NET_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def net_names() -> list[str]:
    load_nets()
    return sorted({net for net, _ in _NETS})


def encoder_names(net: str) -> list[str]:
    load_nets()
    return sorted(enc for n, enc in _NETS if n == net)


def resolve_encoder(net: str, encoder: str) -> str:
    """'default' -> the net's default encoder; unknown names raise UserError."""
    load_nets()
    if net not in _DEFAULT_ENCODER:
        raise UserError(f"-net {net} is unknown; choose one of {', '.join(net_names())}")
    encoder = _DEFAULT_ENCODER[net] if encoder == "default" else encoder
    if (net, encoder) not in _NETS:
        raise UserError(f"-encoder {encoder} does not exist for -net {net}; choose one of "
                        f"{', '.join(encoder_names(net))} or default")
    return encoder


def net_entry(net: str, encoder: str) -> NetEntry:
    return _NETS[(net, resolve_encoder(net, encoder))]


RANDOM = "random"  # the -sam_ckpt value that asks for random base weights explicitly


def base_checkpoint(net: str, encoder: str, requested: Optional[str]) -> Optional[str]:
    """The base weights file to load: `requested` as given, the net's packaged weights when nothing was
    requested, None (random weights) for "random" or for a net that ships no weights."""
    if requested == RANDOM:
        return None
    if requested is not None:
        return requested
    packaged = net_entry(net, encoder).packaged
    return str(packaged.locate()) if packaged is not None else None


def build_segmenter(net: str, encoder: str, image_size: int, num_classes: int,
                    checkpoint: Optional[str] = None, **arch_overrides) -> PromptableSegmenter:
    """Build a net with random weights, or with an official checkpoint loaded strictly."""
    entry = net_entry(net, encoder)
    if image_size <= 0 or image_size % entry.size_multiple:
        raise UserError(f"-image_size {image_size} does not work with -net {net} -encoder {entry.encoder}: "
                        f"use a multiple of {entry.size_multiple} (for example 256 or 1024)")
    model = entry.build(image_size, num_classes, **arch_overrides)
    if checkpoint is not None:
        load_official_checkpoint(model, checkpoint, entry)
    return model


def read_checkpoint_file(path: str, unwrap_key: Optional[str] = None) -> StateDict:
    """Read a .pt/.pth state dict (optionally stored under `unwrap_key`), with one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the official weights file with -sam_ckpt")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means "not a checkpoint"
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}); "
                        f"pass the official .pt/.pth weights file") from None
    if unwrap_key is not None and isinstance(loaded, dict) and isinstance(loaded.get(unwrap_key), dict):
        loaded = loaded[unwrap_key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise UserError(f"{path} holds no state dict of tensors; pass the official weights file")
    return loaded


def load_official_checkpoint(model: nn.Module, path: str, entry: NetEntry) -> None:
    """Strictly load an official checkpoint, after the net's explicit filter (position-table resizing)."""
    state_dict = read_checkpoint_file(path, entry.unwrap_key)
    if entry.checkpoint_filter is not None:
        state_dict = entry.checkpoint_filter(state_dict, model)
    expected = model.state_dict()
    problems = key_differences(expected, state_dict)
    if problems:
        raise UserError(f"checkpoint {path} does not fit -net {entry.net} -encoder {entry.encoder} "
                        f"({entry.checkpoint_format}): {'; '.join(problems)}; pass the matching -net/-encoder")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
