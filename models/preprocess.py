"""Per-net input normalisation, applied inside each net's `encode` so that padding is what the net saw
in pretraining: the toolkit's images arrive as 0..255 values, resized longest-side to S and zero-padded
bottom/right; each normaliser uses only the valid (un-padded) area and sets the padding to 0 afterwards,
as the official pipelines do (segment-anything and LiteMedSAM normalise first and pad with 0 after)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def valid_area(valid_hw: Optional[Tensor], height: int, width: int, batch: int = 1,
               device: Optional[torch.device] = None) -> Tensor:
    """B x 1 x height x width boolean mask of the un-padded top-left area (all True when valid_hw is None).

    valid_hw: B x 2 (height, width) of the valid area, in pixels of this frame."""
    if valid_hw is None:
        return torch.ones(batch, 1, height, width, dtype=torch.bool, device=device)
    valid_hw = valid_hw.to(device)
    inside_h = torch.arange(height, device=device)[None, :] < valid_hw[:, :1]
    inside_w = torch.arange(width, device=device)[None, :] < valid_hw[:, 1:]
    return (inside_h[:, :, None] & inside_w[:, None, :])[:, None]


def standardise(images: Tensor, valid_hw: Optional[Tensor], mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std on the valid area, 0 on the padding (segment-anything's preprocess)."""
    valid = valid_area(valid_hw, images.shape[-2], images.shape[-1], images.shape[0], images.device)
    return ((images - mean) / std) * valid


def min_max(images: Tensor, valid_hw: Optional[Tensor], eps: float = 1e-8) -> Tensor:
    """Per image, (x - min) / max(max - min, eps) over the valid area (all channels), 0 on the padding
    (LiteMedSAM's preprocess: min-max normalise the resized image to [0, 1], then pad with 0)."""
    valid = valid_area(valid_hw, images.shape[-2], images.shape[-1], images.shape[0], images.device)
    low = torch.where(valid, images, torch.inf).amin(dim=(1, 2, 3), keepdim=True)
    high = torch.where(valid, images, -torch.inf).amax(dim=(1, 2, 3), keepdim=True)
    return ((images - low) / (high - low).clamp(min=eps)) * valid


# EfficientSAM's official pipeline stretches each image to the square input (aspect ratio not kept) and
# rescales its prompts per axis; these move the toolkit's padded frame into that geometry and back.
OUTSIDE_LOGIT = -1e4  # the padding of an un-stretched prediction: certainly background


def stretch_to_square(images: Tensor, valid_hw: Optional[Tensor]) -> Tensor:
    """B x 3 x S x S images whose top-left valid_hw holds the image -> each valid area resized (bilinear)
    to the whole S x S frame; unchanged when valid_hw is None."""
    if valid_hw is None:
        return images
    size = images.shape[-2:]
    return torch.cat([F.interpolate(images[b:b + 1, :, :int(h), :int(w)], size=size, mode="bilinear",
                                    align_corners=False) for b, (h, w) in enumerate(valid_hw.tolist())])


def stretch_scale(valid_hw: Tensor, size: int) -> Tensor:
    """B x 2 (x, y) factors that map pixels of the valid area to pixels of the stretched S x S frame."""
    return size / valid_hw.flip(-1).to(torch.float32)


def unstretch(logits: Tensor, valid_hw: Optional[Tensor], size: int) -> Tensor:
    """B x C x s x s logits in the stretched frame -> the same in the padded frame (valid area top-left at its
    own aspect ratio, OUTSIDE_LOGIT elsewhere); `size` is the model input S the valid_hw refers to."""
    if valid_hw is None:
        return logits
    frame = logits.shape[-1]
    out = torch.full_like(logits, OUTSIDE_LOGIT)
    for b, (h, w) in enumerate(valid_hw.tolist()):
        height, width = max(1, round(h * frame / size)), max(1, round(w * frame / size))
        out[b, :, :height, :width] = F.interpolate(logits[b:b + 1], size=(height, width), mode="bilinear",
                                                   align_corners=False)[0]
    return out
