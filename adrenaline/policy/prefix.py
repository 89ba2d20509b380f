"""The router's record of the prefix blocks each prefill instance holds, and the balance rule
of placement by prefix.

``PrefixIndex`` mirrors one prefill instance's prefix cache by block hash
(``engine/block_hash.py``): after each prefill the router adds the prompt's
full-block hashes (the instance has just registered them) and removes the
hashes the instance reports evicted since its previous step. It is bounded
by the instance's KV capacity in blocks and forgets least recently used
hashes first, as the instance's own LRU does, so it stays an approximation
that errs toward forgetting. It is advisory: a wrong guess costs only
recomputation, never correctness (the instance matches by its own cache).

Balance rule (``choose_prefill``): with ``hit[i]`` the request's cached prefix
on instance i (tokens) and ``queued[i]`` the uncached prompt tokens already
placed on i and not yet prefilled, the request goes to the instance with the
least ``(prompt - hit[i]) + prefix_balance * queued[i]``: the work it adds
there plus the work ahead of it. So the instance with the longest cached
prefix wins unless its queue is longer than another's by more than the
tokens the cache saves, divided by ``prefix_balance``. Ties go to the longer
prefix, then to the policy's own choice. ``prefix_balance`` (policy option,
default 1.0, >= 0): 0 follows the prefix whatever the queues; larger values
weigh queues more. When no instance holds any of the prompt, or
``prefix_placement: false``, the policy's own choice stands.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class PrefixIndex:
    """Block hashes one prefill instance is believed to hold, least recently used first."""

    def __init__(self, capacity_blocks: int, block_size: int):
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, h: int) -> bool:
        return h in self._hashes

    def match(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` are held (a chain breaks at its first miss)."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def add(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity_blocks:
            self._hashes.popitem(last=False)

    def remove(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._hashes.pop(h, None)


def choose_prefill(prompt_len: int, hits: list[int], queued: list[int], default: int,
                   balance: float, candidates: list[int] | None = None) -> int:
    """The balance rule above; ``candidates`` limits the choice (default: every instance)."""
    candidates = list(range(len(hits))) if candidates is None else candidates
    if not candidates or max(hits[i] for i in candidates) == 0:
        return default if default in candidates or not candidates else candidates[0]
    queued = queued or [0] * len(hits)

    def key(i: int):
        return ((prompt_len - hits[i]) + balance * queued[i], -hits[i], i != default, i)

    return min(candidates, key=key)
