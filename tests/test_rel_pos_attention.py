"""rel_pos_attention against segment-anything's attention with decomposed relative positions."""
from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Block, add_decomposed_rel_pos, get_rel_pos

from models.rel_pos_attention import rel_pos_attention
from models.sam_vit_blocks import keep_less_for_backward

GRID, HEADS_X_BATCH, DIM, SCALE = (3, 4), 3, 5, 0.3  # a grid that is not square catches swapped axes


def inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    tokens = GRID[0] * GRID[1]
    shapes = [(HEADS_X_BATCH, tokens, DIM)] * 3 + [(GRID[0], GRID[0], DIM), (GRID[1], GRID[1], DIM)]
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in shapes]


def rel_pos_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """SAM's rel_pos_h / rel_pos_w parameters: one row per query - key offset."""
    torch.manual_seed(1)
    return [torch.randn(2 * size - 1, DIM, dtype=dtype, requires_grad=True) for size in GRID]


def ours(q, k, v, rel_pos_h, rel_pos_w):
    tables = [get_rel_pos(size, size, param) for size, param in zip(GRID, (rel_pos_h, rel_pos_w))]
    return rel_pos_attention(q, k, v, *tables, GRID, GRID, SCALE)


def segment_anythings(q, k, v, rel_pos_h, rel_pos_w):
    """What segment-anything's Attention computes after qkv."""
    scores = add_decomposed_rel_pos((q * SCALE) @ k.transpose(-2, -1), q, rel_pos_h, rel_pos_w, GRID, GRID)
    return scores.softmax(dim=-1) @ v


def test_gradients_pass_gradcheck():
    assert torch.autograd.gradcheck(lambda *x: rel_pos_attention(*x, GRID, GRID, SCALE), inputs(torch.float64))


def test_output_and_gradients_equal_segment_anythings():
    q, k, v, _, _ = inputs(torch.float64)
    params = rel_pos_params(torch.float64)
    results = []
    for attention in (ours, segment_anythings):
        out = attention(q, k, v, *params)
        grads = torch.autograd.grad(out.sin().sum(), [q, k, v, *params])
        results.append([out, *grads])
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_only_q_k_v_and_the_tables_are_kept_for_backward():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = rel_pos_attention(*inputs(torch.float32), GRID, GRID, SCALE)
    tokens = GRID[0] * GRID[1]
    assert sorted(saved) == sorted([HEADS_X_BATCH * tokens * DIM] * 3 + [GRID[0] ** 2 * DIM, GRID[1] ** 2 * DIM])
    out.sum().backward()


# (height, width, window): global; whole windows; padded windows (the last row and column of windows,
# and their corner, ask fewer queries); a grid that is not square; a grid smaller than one window
@pytest.mark.parametrize("height,width,window_size", [(6, 6, 0), (6, 6, 6), (6, 6, 4), (7, 5, 3), (5, 5, 14)])
def test_full_fine_tuning_gradients_of_the_lean_block_equal_segment_anythings(height, width, window_size):
    """Every parameter trains (rel_pos tables included), in float64."""
    torch.manual_seed(0)
    input_size = (height, width) if window_size == 0 else (window_size, window_size)
    reference = Block(16, 2, window_size=window_size, use_rel_pos=True, input_size=input_size).double()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.2)
    lean = keep_less_for_backward(copy.deepcopy(reference))
    x = torch.randn(2, height, width, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for block in (reference, lean):
        out = block(x)
        results.append([out, *torch.autograd.grad(out.sin().sum(), [x, *block.parameters()])])
    assert len(results[0]) == 2 + len(list(reference.parameters()))
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-11)


def test_without_gradients_no_autograd_node_is_made():
    q, k, v, table_h, table_w = inputs(torch.float32)
    with torch.no_grad():
        out = rel_pos_attention(q, k, v, table_h, table_w, GRID, GRID, SCALE)
    assert out.grad_fn is None
    torch.testing.assert_close(out, rel_pos_attention(q, k, v, table_h, table_w, GRID, GRID, SCALE).detach())


def test_bf16_autocast_stays_close_to_float32():
    q, k, v, table_h, table_w = inputs(torch.float32)
    out32 = rel_pos_attention(q, k, v, table_h, table_w, GRID, GRID, SCALE)
    grads32 = torch.autograd.grad(out32.sum(), [q, table_h])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rel_pos_attention(*(t.bfloat16() for t in (q, k, v)), table_h, table_w, GRID, GRID, SCALE)
    grads16 = torch.autograd.grad(low.float().sum(), [q, table_h])
    assert low.dtype == torch.bfloat16 and grads16[1].dtype == torch.float32
    torch.testing.assert_close(low.float(), out32, rtol=0.05, atol=0.05)
    for value, expected in zip(grads16, grads32):
        torch.testing.assert_close(value.float(), expected, rtol=0.1, atol=0.1)
