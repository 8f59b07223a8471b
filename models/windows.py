"""Window attention over a zero-padded token grid, asked by the real tokens only (SAM's ViT and TinyViT).

Both encoders pad an H x W grid with zero tokens to whole side x side windows, attend within each window
and crop the padded tokens' outputs away. Only the padding's keys and values reach the real tokens, and
they are one zero token's, the same everywhere. So the real tokens are projected, the padding gets that
one token's keys and values, and the windows are taken in up to four spans that are padded alike (whole
windows, the padded last column and last row of windows, their corner), whose real queries attend to all
of their window's keys: the same numbers without the padded queries' work. At 256 px a 16 x 16 grid in
14 x 14 windows is 28 x 28 padded, three times the real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class WindowSpan:
    """The real tokens [top, bottom) x [left, right) of a run of side x side windows padded alike."""

    top: int
    bottom: int
    left: int
    right: int
    side: int

    @property
    def query_grid(self) -> tuple[int, int]:
        """Rows and columns of real tokens in each of the span's windows, at the window's top left."""
        return min(self.side, self.bottom - self.top), min(self.side, self.right - self.left)

    @property
    def windows(self) -> tuple[int, int]:
        rows, cols = self.query_grid
        return (self.bottom - self.top) // rows, (self.right - self.left) // cols


def _whole_windows_and_rest(size: int, side: int) -> list[tuple[int, int]]:
    """[start, stop) spans of a grid axis: the whole windows, then the last padded window's real part
    (16 tokens in windows of 14 -> [(0, 14), (14, 16)])."""
    whole = size - size % side
    return [(start, stop) for start, stop in ((0, whole), (whole, size)) if stop > start]


def window_spans(height: int, width: int, side: int) -> list[list[WindowSpan]]:
    """The spans of a height x width grid in side x side windows, row by row."""
    return [[WindowSpan(top, bottom, left, right, side) for left, right in _whole_windows_and_rest(width, side)]
            for top, bottom in _whole_windows_and_rest(height, side)]


def needs_padding(height: int, width: int, side: int) -> bool:
    return bool(height % side or width % side)


def _region(tokens: Tensor, span: WindowSpan) -> Tensor:
    """The span's part of B x H x W x ... `tokens`; the tokens themselves where it is all of them (a slice
    would add a backward that fills a zero tensor of the whole grid)."""
    if (span.top, span.left, span.bottom, span.right) == (0, 0, *tokens.shape[1:3]):
        return tokens
    return tokens[:, span.top:span.bottom, span.left:span.right]


def span_queries(tokens: Tensor, span: WindowSpan) -> Tensor:
    """The span's real tokens of B x H x W x ... `tokens`, window by window: (B x windows) x queries x ..."""
    batch, features = tokens.shape[0], tokens.shape[3:]
    (query_rows, query_cols), (rows, cols) = span.query_grid, span.windows
    queries = _region(tokens, span).reshape(batch, rows, query_rows, cols, query_cols, *features)
    return queries.transpose(2, 3).reshape(batch * rows * cols, query_rows * query_cols, *features)


def span_keys(tokens: Tensor, padding: Optional[Tensor], span: WindowSpan) -> Tensor:
    """The span's windows of B x H x W x ... `tokens`, their padded part filled with `padding` (a zero token's
    values, shaped like one token; unused for whole windows): (B x windows) x side*side x ..."""
    batch, features = tokens.shape[0], tokens.shape[3:]
    side, (rows, cols) = span.side, span.windows
    region = _region(tokens, span)
    query_rows, query_cols = span.query_grid
    if query_cols < side:
        region = torch.cat([region, padding.expand(batch, region.shape[1], side - query_cols, *features)], dim=2)
    if query_rows < side:
        region = torch.cat([region, padding.expand(batch, side - query_rows, region.shape[2], *features)], dim=1)
    windows = region.reshape(batch, rows, side, cols, side, *features).transpose(2, 3)
    return windows.reshape(batch * rows * cols, side * side, *features)


def assemble(outputs: list[list[Tensor]], spans: list[list[WindowSpan]], batch: int) -> Tensor:
    """The spans' (B x windows) x queries x ... outputs put back on the B x H x W x ... grid (joined with
    `cat`, not written into a buffer in place: an exported ONNX graph computes in-place slice writes wrong)."""
    def placed(out: Tensor, span: WindowSpan) -> Tensor:
        (query_rows, query_cols), (rows, cols) = span.query_grid, span.windows
        out = out.view(batch, rows, cols, query_rows, query_cols, *out.shape[2:]).transpose(2, 3)
        return out.reshape(batch, span.bottom - span.top, span.right - span.left, *out.shape[5:])

    def joined(parts: list[Tensor], dim: int) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    return joined([joined([placed(out, span) for out, span in zip(row_outputs, row)], dim=2)
                   for row_outputs, row in zip(outputs, spans)], dim=1)
