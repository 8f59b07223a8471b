"""Comparing a state dict with the tensors a model expects (official checkpoints and run weights)."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor


def key_differences(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """What keeps `given` from loading strictly where `expected` is: one phrase per kind of problem,
    e.g. ["2 missing keys (e.g. a.weight)", "1 shape mismatch (e.g. b.bias)"]; empty when it fits."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    return [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)) if keys]
