"""The batch planner's cuts: the cheapest plan among every way to split the messages, within the limits."""

from __future__ import annotations

import random

import pytest

from filterd.model.grouping import group_of, partition


def _cost(groups: list[list[int]], lengths: list[int], overhead: float) -> float:
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _set_partitions(rest):
        yield [[first]] + p
        for k in range(len(p)):
            yield p[:k] + [[first] + p[k]] + p[k + 1 :]


def _allowed(groups: list[list[int]], lengths: list[int], size: int, budget: int) -> bool:
    return all(len(g) == 1 or (len(g) <= size and len(g) * max(lengths[i] for i in g) <= budget) for g in groups)


@pytest.mark.parametrize("seed", range(40))
def test_partition_is_the_cheapest_of_all_set_partitions(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    lengths = [rng.choice([1, 2, 5, 9, 30, 31, 80]) for _ in range(n)]
    overhead, size, budget = rng.choice([1, 10, 40, 500]), rng.randint(1, 5), rng.choice([40, 100, 10_000])
    groups = partition(lengths, overhead, size, budget)
    assert sorted(i for g in groups for i in g) == list(range(n))  # every message exactly once
    assert _allowed(groups, lengths, size, budget)
    best = min(_cost(p, lengths, overhead) for p in _set_partitions(list(range(n))) if _allowed(p, lengths, size, budget))
    assert _cost(groups, lengths, overhead) == pytest.approx(best)


def test_overhead_trades_padding_against_passes() -> None:
    lengths = [10] * 8 + [100] * 8
    assert len(partition(lengths, 5, 64, 10_000)) == 2  # cheap passes: no padding
    assert len(partition(lengths, 2_000, 64, 10_000)) == 1  # costly passes: one padded pass
    assert len(partition(lengths, 2_000, 64, 1_000)) == 2  # ... unless the token budget forbids it


def test_a_message_over_the_budget_goes_alone_and_the_oldest_is_found() -> None:
    assert partition([5000, 3, 4], 10, 64, 100) == [[1, 2], [0]]
    assert group_of(0, [5000, 3, 4], 10, 64, 100) == [0]
    assert sorted(group_of(2, [5000, 3, 4], 10, 64, 100)) == [1, 2]
    assert partition([], 10, 64, 100) == []
