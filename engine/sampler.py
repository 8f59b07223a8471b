"""Deterministic samplers: the order depends only on (seed, epoch), so one process and N processes
see the same global batches, and a resumed run can skip the batches it already trained on."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def steps_per_epoch(size: int, global_batch: int) -> int:
    """Whole global batches per epoch (at least one: a small set is repeated to fill it)."""
    return max(1, size // global_batch)


class EpochShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch, cut to whole global batches and dealt round-robin over ranks.

    Rank r takes positions r, r + W, ... of each global batch, so the global batch of step k is the
    same set of samples for any world size W. `skip_steps` drops the first steps of the epoch.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError("global batch must be divisible by the number of processes")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_steps = 0, 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip_steps = epoch, skip_steps

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.size, self.global_batch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        usable = self.steps_per_epoch() * self.global_batch
        order = (order * math.ceil(usable / self.size))[:usable]
        for step in range(self.skip_steps, self.steps_per_epoch()):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield from batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.skip_steps) * self.global_batch // self.world_size


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes samples r, r + W, ... exactly once (no padding duplicates)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
