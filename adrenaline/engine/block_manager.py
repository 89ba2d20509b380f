"""Paged KV block accounting: which blocks each sequence owns, which are free.

Invariants: every block id in [0, num_blocks) is either in the free list or
in exactly one sequence's table, never both; a sequence's table covers at
least its cached tokens (ceil(tokens / block_size) blocks). Allocation takes
from the front of the free list, freeing returns blocks to its back in table
order, so block ids are deterministic for a given history.
"""

from __future__ import annotations

from collections import deque


class BlockManagerError(RuntimeError):
    """Misuse of the block manager (double allocation, unknown sequence, no space)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give a new sequence blocks for ``num_tokens`` tokens; returns its table."""
        if seq_id in self._tables:
            raise BlockManagerError(f"sequence {seq_id!r} already has blocks")
        if not self.can_allocate(num_tokens):
            raise BlockManagerError(f"no space for {num_tokens} tokens of {seq_id!r}")
        table = [self._free.popleft() for _ in range(self.blocks_for(num_tokens))]
        self._tables[seq_id] = table
        return table

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Can the sequence's table grow to cover ``num_tokens`` tokens?"""
        missing = self.blocks_for(num_tokens) - len(self._table(seq_id))
        return missing <= len(self._free)

    def append(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the table to cover ``num_tokens`` tokens; returns the blocks added."""
        table = self._table(seq_id)
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise BlockManagerError(f"no space to grow {seq_id!r} to {num_tokens} tokens")
        added = [self._free.popleft() for _ in range(max(missing, 0))]
        table.extend(added)
        return added

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """``append`` if it fits (True), else nothing (False): one lookup for the per-step path."""
        table = self._tables.get(seq_id)
        if table is None:
            self._unknown(seq_id)
        missing = -(-num_tokens // self.block_size) - len(table)
        if missing <= 0:
            return True
        free = self._free
        if missing > len(free):
            return False
        table.extend([free.popleft() for _ in range(missing)])
        return True

    def free(self, seq_id: str) -> None:
        self._free.extend(self._table(seq_id))
        del self._tables[seq_id]

    def check_invariants(self) -> None:
        """Every block is free or owned exactly once (used by tests and debug checks)."""
        owned = [b for t in self._tables.values() for b in t]
        all_ids = sorted(owned + list(self._free))
        if all_ids != list(range(self.num_blocks)):
            raise BlockManagerError("block accounting is corrupt (leak or double ownership)")

    def _table(self, seq_id: str) -> list[int]:
        if seq_id not in self._tables:
            self._unknown(seq_id)
        return self._tables[seq_id]

    def _unknown(self, seq_id: str):
        raise BlockManagerError(f"sequence {seq_id!r} has no blocks")
