"""Deterministic samplers and the learning-rate schedule."""
from __future__ import annotations

import math

import pytest

from engine.sampler import EpochShuffleSampler, ShardSampler, steps_per_epoch
from engine.trainer import learning_rate_factor


def epoch_order(size, global_batch, seed, epoch, rank=0, world_size=1, skip_steps=0):
    sampler = EpochShuffleSampler(size, global_batch, seed, rank, world_size)
    sampler.set_epoch(epoch, skip_steps)
    return list(sampler)


def test_steps_per_epoch():
    assert steps_per_epoch(10, 4) == 2  # whole global batches only
    assert steps_per_epoch(8, 4) == 2
    assert steps_per_epoch(3, 4) == 1  # a small set is repeated to fill one batch


def test_order_depends_only_on_seed_and_epoch():
    first = epoch_order(10, 4, seed=3, epoch=2)
    # a sampler that went through epochs 0 and 1 first gives the same epoch-2 order
    sampler = EpochShuffleSampler(10, 4, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        walked = list(sampler)
    assert walked == first
    assert epoch_order(10, 4, seed=3, epoch=2) == first
    assert epoch_order(10, 4, seed=3, epoch=3) != first
    assert epoch_order(10, 4, seed=4, epoch=2) != first


def test_one_epoch_is_whole_global_batches_of_distinct_samples():
    order = epoch_order(10, 4, seed=0, epoch=0)
    assert len(order) == 8  # 2 steps x 4; the 2 left-over samples are dropped this epoch
    assert len(set(order)) == 8 and set(order) <= set(range(10))
    assert len(EpochShuffleSampler(10, 4, seed=0)) == 8


def test_small_set_is_repeated_to_fill_a_batch():
    order = epoch_order(3, 4, seed=1, epoch=0)
    assert len(order) == 4
    assert set(order) == {0, 1, 2}  # every sample, one of them twice


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_identical_for_any_world_size(world_size):
    size, global_batch, seed, epoch = 23, 4, 7, 5
    single = epoch_order(size, global_batch, seed, epoch)
    per_rank = [epoch_order(size, global_batch, seed, epoch, rank, world_size) for rank in range(world_size)]
    local = global_batch // world_size
    steps = steps_per_epoch(size, global_batch)
    assert steps == 5
    for rank_order in per_rank:
        assert len(rank_order) == steps * local
    for k in range(steps):
        global_k = single[k * global_batch:(k + 1) * global_batch]
        chunks = [rank_order[k * local:(k + 1) * local] for rank_order in per_rank]
        assert sorted(i for chunk in chunks for i in chunk) == sorted(global_k)
        for rank, chunk in enumerate(chunks):  # dealt round-robin
            assert chunk == global_k[rank::world_size]


def test_len_per_rank():
    assert len(EpochShuffleSampler(23, 4, seed=0, rank=1, world_size=2)) == 5 * 2
    assert len(EpochShuffleSampler(23, 4, seed=0, rank=3, world_size=4)) == 5 * 1
    with pytest.raises(ValueError):
        EpochShuffleSampler(23, 4, seed=0, rank=0, world_size=3)


def test_skip_steps_yields_exactly_the_tail():
    full = epoch_order(23, 4, seed=2, epoch=1)
    sampler = EpochShuffleSampler(23, 4, seed=2)
    sampler.set_epoch(1, skip_steps=2)
    tail = list(sampler)
    assert tail == full[2 * 4:]
    assert len(sampler) == len(tail) == 3 * 4
    # per rank: the tail of that rank's own order
    rank_full = epoch_order(23, 4, seed=2, epoch=1, rank=1, world_size=2)
    rank_tail = epoch_order(23, 4, seed=2, epoch=1, rank=1, world_size=2, skip_steps=2)
    assert rank_tail == rank_full[2 * 2:]
    # skipping every step leaves nothing
    sampler.set_epoch(1, skip_steps=5)
    assert list(sampler) == [] and len(sampler) == 0
    # the next epoch starts from the beginning again
    sampler.set_epoch(2)
    assert len(list(sampler)) == 20


@pytest.mark.parametrize("size,world_size", [(7, 3), (8, 2), (2, 4), (1, 1)])
def test_shard_sampler_covers_each_index_exactly_once(size, world_size):
    shards = [list(ShardSampler(size, rank, world_size)) for rank in range(world_size)]
    merged = [i for shard in shards for i in shard]
    assert sorted(merged) == list(range(size))
    assert [len(ShardSampler(size, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]


def test_shard_sampler_deals_round_robin():
    assert list(ShardSampler(7, 0, 3)) == [0, 3, 6]
    assert list(ShardSampler(7, 1, 3)) == [1, 4]
    assert list(ShardSampler(7, 2, 3)) == [2, 5]


def test_learning_rate_factor_cosine():
    assert learning_rate_factor("cosine", 0, 100) == pytest.approx(1.0)
    assert learning_rate_factor("cosine", 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.8536
    assert learning_rate_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert learning_rate_factor("cosine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_factor("cosine", 150, 100) == pytest.approx(0.0, abs=1e-12)  # clamped past the end


def test_learning_rate_factor_step():
    assert learning_rate_factor("step", 0, 90) == 1.0
    assert learning_rate_factor("step", 45, 90) == 1.0
    assert learning_rate_factor("step", 59, 90) == 1.0
    assert learning_rate_factor("step", 60, 90) == pytest.approx(0.1)  # from 2/3 of the steps on
    assert learning_rate_factor("step", 90, 90) == pytest.approx(0.1)


def test_learning_rate_factor_none():
    assert [learning_rate_factor("none", s, 90) for s in (0, 45, 90)] == [1.0, 1.0, 1.0]


def test_learning_rate_factor_zero_total_steps():
    assert learning_rate_factor("cosine", 0, 0) == pytest.approx(1.0)
