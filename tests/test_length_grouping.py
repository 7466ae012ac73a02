"""--group_by_length: every example once per epoch, batches of similar length, an order fixed by seed and epoch."""

from __future__ import annotations

import random

from multiexit.runner.training import LengthGroupedSampler


def batches_of(sampler: LengthGroupedSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def test_a_permutation_in_batches_of_similar_length() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(1003)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(1003)) and len(sampler) == 1003
    batches = batches_of(sampler, 16)
    assert all(len(batch) == 16 for batch in batches[:-1]) and len(batches[-1]) == 1003 % 16  # the short one last
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                        for b in [list(range(s, s + 16)) for s in range(0, 992, 16)]) / 62
    assert spread < random_spread / 4  # padding per batch shrinks accordingly


def test_the_order_depends_on_seed_and_epoch_only() -> None:
    lengths = [random.Random(i).randint(3, 60) for i in range(300)]
    first, again = LengthGroupedSampler(lengths, 8, seed=3), LengthGroupedSampler(lengths, 8, seed=3)
    assert list(first) == list(again)
    first.set_epoch(1)
    assert list(first) != list(again)
    again.set_epoch(1)
    assert list(first) == list(again)
    assert list(LengthGroupedSampler(lengths, 8, seed=4)) != list(LengthGroupedSampler(lengths, 8, seed=3))
