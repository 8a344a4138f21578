"""Which messages share a forward pass: the least padding for the fewest passes.

A batch is padded to its longest message, so its cost is about `overhead + count * longest` in
token units: `overhead` is what one forward pass costs whatever its size (reading every weight once,
launching kernels), expressed as the tokens that time would have scored (the engine measures it at
load, `Engine.overhead_tokens`). Sorting by length and cutting the sorted run into contiguous groups
is optimal for this cost; where to cut is a small dynamic programme over the sorted lengths.

Measured on 2,000 UCI messages arriving at once (124M, 2 CPU cores, overhead ~30 tokens): batches of
a fixed 64 in sorted order would pad 9.5% of the tokens they compute, batches grown around the oldest
message by nearest length padded 14.5%; these cuts pad 1.8% (engine) to 3.5% (daemon), and the
passes stay large enough (hundreds of tokens) for the matrix multiplies to run near their best rate
(bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# What one forward pass costs beyond its tokens, in tokens, where it has not been measured (offline
# scoring, training, engines without `overhead_tokens`): 124M measured ~31 on 2 CPU cores (fp32 and
# bf16); a GPU's runs to thousands.
DEFAULT_OVERHEAD_TOKENS = 64.0


def partition(lengths: Sequence[int], overhead_tokens: float, max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, shortest first, minimising the total estimated cost.

    Each batch holds at most `max_batch_size` messages and `max_batch_tokens` padded tokens, except
    a message longer than the token budget, which goes alone (nothing is ever unschedulable).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size = [lengths[i] for i in order]
    n = len(order)
    best = np.full(n + 1, np.inf)  # best[j]: cheapest cost of the first j sorted messages
    best[0] = 0.0
    cut = [0] * (n + 1)  # cut[j]: where the last batch of that cheapest plan starts
    starts = np.arange(n + 1, dtype=np.float64)
    for j in range(1, n + 1):
        longest = size[j - 1]  # sorted: the last one in is the longest, so a batch i..j costs (j - i) * longest
        most = max(1, min(max_batch_size, max_batch_tokens // longest))  # one message always fits
        lo = j - min(most, j)
        # one vectorised step per message keeps planning O(n) Python steps whatever the batch size
        costs = best[lo:j] + (j - starts[lo:j]) * longest
        k = len(costs) - 1 - int(np.argmin(costs[::-1]))  # ties: the shorter last batch, so the remainder comes last
        best[j], cut[j] = costs[k] + overhead_tokens, lo + k
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    groups.reverse()
    return groups


def group_of(first: int, lengths: Sequence[int], overhead_tokens: float, max_batch_size: int, max_batch_tokens: int) -> list[int]:
    """The batch, among the cheapest plan for `lengths`, that holds message `first`."""
    for group in partition(lengths, overhead_tokens, max_batch_size, max_batch_tokens):
        if first in group:
            return group
    raise IndexError(first)
