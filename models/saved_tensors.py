"""Keep less for backward: a tensor that backward needs but that is a cheap function of a tensor autograd
keeps anyway is stored as that recipe and recomputed when backward asks for it.

Example: the MLP's fc2 (or its LoRA branch) saves its input gelu(h), while GELU already saves h; storing
`gelu(h)` as "recompute from h" frees one 4*dim activation per token for the cost of one GELU in backward.
A recipe may also rerun a matmul (TinyViT's optional MLP recompute): more memory freed, more time spent.
Activation checkpointing recomputes whole blocks itself, so it switches this off inside them.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
from torch import Tensor

_ACTIVE = contextvars.ContextVar("saved_tensor_recipes", default=True)


@contextlib.contextmanager
def saved_as_recipe(tensor: Tensor, recompute: Callable[[], Tensor]) -> Iterator[None]:
    """Inside the block, anything autograd saves that is (a view of) `tensor` keeps `recompute` instead.

    `recompute()` must rebuild `tensor`'s values from tensors autograd saves anyway (it runs without
    gradient in backward). Off when gradients are off, while compiling, inside activation checkpointing,
    and for a non-contiguous `tensor`.
    """
    if (not _ACTIVE.get() or not torch.is_grad_enabled() or not tensor.requires_grad
            or not tensor.is_contiguous() or torch.compiler.is_compiling()):
        yield
        return
    storage, dtype = tensor.untyped_storage().data_ptr(), tensor.dtype  # the hooks must not hold `tensor`

    def pack(saved: Tensor):
        if saved.untyped_storage().data_ptr() != storage or saved.dtype != dtype:
            return saved
        return saved.shape, saved.stride(), saved.storage_offset()

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        shape, stride, offset = packed
        with torch.no_grad():
            return recompute().as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def cast_for_matmul(tensor: Tensor) -> Tensor:
    """`tensor` in the dtype autocast gives a matmul's inputs (itself when autocast is off).

    Casting once, before a linear and its LoRA branch, means both share one low-precision copy, which
    `saved_as_recipe` can then cover; left to autocast, the branch would save a cast of its own.
    """
    device = tensor.device.type
    if not torch.is_autocast_enabled(device) or not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.get_autocast_dtype(device))


def same_autocast(device_type: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of contexts that re-enter the autocast state in force now: a recipe that reruns a matmul
    in backward (outside the forward's autocast) must give the forward's dtypes and values."""
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype, enabled=enabled)


@contextlib.contextmanager
def without_recipes() -> Iterator[None]:
    """Save tensors as they are (activation checkpointing stores and recomputes on its own)."""
    token = _ACTIVE.set(False)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
