"""EfficientSAM's prompt encoder: every prompt is a labelled point, and there is no dense prompt.

Labels: 1 foreground click, 0 background click (positional encoding only), 2 / 3 box top-left /
bottom-right corner, -1 padding (keeps its positional encoding and adds `invalid_points`).
Coordinates are in the official 1024 x 1024 decoder frame; +0.5 and /1024 put them in 0..1.
Every query carries exactly `MAX_POINTS` points, padded with (-1, -1) / label -1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..segmenter import Prompts

EMBED_DIM = 256
PROMPT_FRAME = 1024  # the official decoder's input size; prompts are rescaled to it
MAX_POINTS = 6
PAD, BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class RandomFourierPositions(nn.Module):
    """Positional encoding of 0..1 xy coordinates with a fixed random Gaussian projection."""

    def __init__(self, num_feats: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_feats))

    def encode(self, unit_xy: Tensor) -> Tensor:
        """... x 2 coordinates in 0..1 -> ... x 2*num_feats."""
        projected = (2 * unit_xy - 1) @ self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * projected
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def dense(self, height: int, width: int) -> Tensor:
        """Encoding of the cell centres of a height x width grid: 1 x C x height x width."""
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(height, device=matrix.device, dtype=matrix.dtype) + 0.5) / height
        xs = (torch.arange(width, device=matrix.device, dtype=matrix.dtype) + 0.5) / width
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self.encode(grid).permute(2, 0, 1)[None]


class EfficientSamPromptEncoder(nn.Module):
    """Q x N labelled points in the 1024 frame -> Q x N x 256 sparse embeddings."""

    def __init__(self, embed_dim: int = EMBED_DIM, input_size: int = PROMPT_FRAME):
        super().__init__()
        self.input_size = input_size
        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)

    def forward(self, coords: Tensor, labels: Tensor) -> Tensor:
        unit = (coords.to(self.pe_layer.positional_encoding_gaussian_matrix.dtype) + 0.5) / self.input_size
        embedding = self.pe_layer.encode(unit)
        labels = labels[..., None]
        for label, table in ((PAD, self.invalid_points), (FOREGROUND, self.point_embeddings),
                             (BOX_TOP_LEFT, self.bbox_top_left_embeddings),
                             (BOX_BOTTOM_RIGHT, self.bbox_bottom_right_embeddings)):
            embedding = torch.where(labels == label, embedding + table.weight, embedding)
        return embedding

    def dense_pe(self, height: int, width: int) -> Tensor:
        return self.pe_layer.dense(height, width)


def _valid_first(points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Move padding points (label -1) behind the others, keeping the order of each group."""
    order = torch.argsort((labels == PAD).to(torch.uint8), dim=1, stable=True)
    return points.gather(1, order[..., None].expand(-1, -1, 2)), labels.gather(1, order)


def prompt_points(prompts: Prompts, queries: int, image_size: int, device: Optional[torch.device] = None,
                  frame: int = PROMPT_FRAME, max_points: int = MAX_POINTS) -> tuple[Tensor, Tensor]:
    """Per-query prompts in S x S pixels -> (Q x max_points x 2 coordinates in the `frame` x `frame`
    decoder frame, Q x max_points int64 labels), as the official `predict_masks` builds them.

    Clicks come first, then a box's two corners (labels 2, 3). Padding points are moved behind the
    real ones before padding / truncating to `max_points` (the decoder is invariant to the order of
    its prompt tokens), and with a box at most `max_points - 2` clicks are kept so truncation never
    drops a corner. No prompt at all gives one padding point. Coordinates are scaled by frame / S;
    negative coordinates and padding points become -1, as in the official `get_rescaled_pts`.
    """
    parts: list[tuple[Tensor, Tensor]] = []
    if prompts.points is not None:
        clicks = prompts.points.to(device).float()
        labels = (torch.ones(clicks.shape[:2], dtype=torch.long, device=clicks.device)
                  if prompts.point_labels is None else prompts.point_labels.to(clicks.device).long())
        clicks, labels = _valid_first(clicks, labels)
        keep = max_points - (2 if prompts.boxes is not None else 0)
        parts.append((clicks[:, :keep], labels[:, :keep]))
    if prompts.boxes is not None:
        corners = prompts.boxes.to(device).float().reshape(-1, 2, 2)
        labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=corners.device).expand(corners.shape[0], 2)
        parts.append((corners, labels))
    if not parts:
        parts.append((torch.full((queries, 1, 2), -1.0, device=device),
                      torch.full((queries, 1), PAD, dtype=torch.long, device=device)))
    points, labels = _valid_first(torch.cat([p for p, _ in parts], dim=1), torch.cat([l for _, l in parts], dim=1))
    points, labels = points[:, :max_points], labels[:, :max_points]
    missing = max_points - points.shape[1]
    if missing:
        points = torch.cat([points, points.new_full((points.shape[0], missing, 2), -1.0)], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], missing), PAD)], dim=1)
    if points.shape[0] != queries:
        raise ValueError(f"prompts for {points.shape[0]} queries, expected {queries}")
    scaled = torch.where(points >= 0, points * frame / image_size, -1.0)
    return torch.where(labels[..., None] == PAD, -1.0, scaled), labels
