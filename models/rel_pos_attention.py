"""Attention with SAM's decomposed relative-position bias that keeps only q, k and v for backward.

segment-anything's ViT adds to every attention score a bias from two learned tables, one per grid axis:
    score[i, j] = scale * q_i . k_j + q_i . Rh[row(i), row(j)] + q_i . Rw[col(i), col(j)]
and then softmaxes and multiplies with v as separate operations, so autograd keeps the scaled q, the
bias terms' operands and the full queries x keys probability matrix of every head. At 256 px, batch 2,
these were about 350 MB of SAM ViT-B's saved activations. `rel_pos_attention` keeps only q, k, v and the
two small tables; backward forms the probabilities again (one more q.k product and softmax per block)
and takes every gradient from them.
"""
from __future__ import annotations

import torch
from torch import Tensor

Grid = tuple[int, int]


def _probabilities(q: Tensor, k: Tensor, table_h: Tensor, table_w: Tensor, query_grid: Grid, key_grid: Grid,
                   scale: float) -> Tensor:
    """softmax(scale * q k^T + bias), BH x queries x keys, in float32 or wider (as autocast runs softmax)."""
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    rows = q.unflatten(1, query_grid)
    by_row = torch.einsum("bhwc,hkc->bhwk", rows, table_h.to(q.dtype))  # q . Rh: BH x h x w x key rows
    by_col = torch.einsum("bhwc,wkc->bhwk", rows, table_w.to(q.dtype))  # q . Rw: BH x h x w x key columns
    grid_scores = scores.view(scores.shape[0], *query_grid, *key_grid)
    grid_scores.add_(by_row[..., :, None]).add_(by_col[..., None, :])
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def _attention(q: Tensor, k: Tensor, v: Tensor, table_h: Tensor, table_w: Tensor, query_grid: Grid,
               key_grid: Grid, scale: float) -> Tensor:
    """The attention's output, BH x queries x C."""
    probs = _probabilities(q, k, table_h, table_w, query_grid, key_grid, scale)
    return torch.bmm(probs.to(v.dtype), v)


class _RelPosAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table_h: Tensor, table_w: Tensor, query_grid: Grid,
                key_grid: Grid, scale: float) -> Tensor:
        ctx.save_for_backward(q, k, v, table_h, table_w)
        ctx.grids, ctx.scale = (query_grid, key_grid), scale
        return _attention(q, k, v, table_h, table_w, query_grid, key_grid, scale)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, table_h, table_w = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):  # in the dtypes forward saw
            return *_gradients(grad_out, q, k, v, table_h, table_w, *ctx.grids, ctx.scale), None, None, None


def _gradients(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, table_h: Tensor, table_w: Tensor,
               query_grid: Grid, key_grid: Grid, scale: float) -> tuple[Tensor, ...]:
    """The gradients of q, k, v and both tables, from the probabilities formed again."""
    probs = _probabilities(q, k, table_h, table_w, query_grid, key_grid, scale)
    grad_out = grad_out.to(v.dtype)
    grad_v = torch.bmm(probs.to(v.dtype).transpose(1, 2), grad_out)
    grad_probs = torch.bmm(grad_out, v.transpose(1, 2)).to(probs.dtype)
    # softmax's own backward kernel, as autograd would call it: P * (dP - sum_j P dP)
    grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).to(q.dtype)
    del probs, grad_probs
    grad_q = torch.bmm(grad_scores, k).mul_(scale)
    grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(scale)
    grid_scores = grad_scores.view(*grad_scores.shape[:2], *key_grid)  # BH x queries x key rows x key columns
    grad_by_row = grid_scores.sum(-1).unflatten(1, query_grid)
    grad_by_col = grid_scores.sum(-2).unflatten(1, query_grid)
    rows = q.unflatten(1, query_grid)
    grad_q += (torch.einsum("bhwk,hkc->bhwc", grad_by_row, table_h.to(q.dtype))
               + torch.einsum("bhwk,wkc->bhwc", grad_by_col, table_w.to(q.dtype))).flatten(1, 2)
    grad_h = torch.einsum("bhwk,bhwc->hkc", grad_by_row, rows).to(table_h.dtype)
    grad_w = torch.einsum("bhwk,bhwc->wkc", grad_by_col, rows).to(table_w.dtype)
    return grad_q, grad_k, grad_v, grad_h, grad_w


def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, table_h: Tensor, table_w: Tensor, query_grid: Grid,
                      key_grid: Grid, scale: float) -> Tensor:
    """softmax(scale * q k^T + bias) v for BH x queries x C q and BH x keys x C k, v, the queries and keys
    laid out row-major on `query_grid` and `key_grid`, with segment-anything's decomposed relative-position
    bias from `table_h` (query rows x key rows x C) and `table_w` (query columns x key columns x C), as its
    `get_rel_pos` gathers them (applied to the unscaled q). Keeps q, k, v and the tables for backward."""
    inputs = (q, k, v, table_h, table_w, tuple(query_grid), tuple(key_grid), scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:5]):
        return _RelPosAttention.apply(*inputs)
    return _attention(*inputs)  # nothing to keep (and no custom autograd node for a tracer)
