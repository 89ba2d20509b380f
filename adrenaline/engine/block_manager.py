"""Paged KV block accounting: which blocks each sequence uses, which are free, which are cached.

Invariants: every block id in [0, num_blocks) is in exactly one of: the free
list (no cached content), the evictable LRU (free, but holding a cached
prefix block), or one or more sequences' tables; its reference count is the
number of tables it appears in. A sequence's table covers at least its cached
tokens (ceil(tokens / block_size) blocks).

Prefix caching (``enable_caching``): a full block whose KV has been computed
is registered under its hash (``engine/block_hash.py``: the previous block's
hash chained with the block's tokens). A new sequence whose leading full
blocks' hashes are registered shares those blocks (reference counted)
instead of computing them again. When the last sequence using a block frees
it, a registered block goes to the back of the evictable LRU, not the free
list: its content stays reusable. Allocation takes uncached free blocks
first and evicts the least recently freed cached block only when none is
left (memory is needed). A sequence's blocks are freed tail first, so a
chain's later blocks are evicted before the blocks they hang from.

Without caching (the default here), allocation takes from the front of the
free list and freeing returns blocks to its back in table order, so block
ids are deterministic for a given history.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from adrenaline.engine.block_hash import ROOT_HASH, block_hashes


class BlockManagerError(RuntimeError):
    """Misuse of the block manager (double allocation, unknown sequence, no space)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._ref = [0] * num_blocks
        # Prefix cache: hash <-> block for registered full blocks (in use or evictable).
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._block_of: dict[int, int] = {}  # hash -> block
        # Per sequence: how many leading blocks are hashed, and the last of those hashes.
        self._hashed: dict[str, tuple[int, int]] = {}
        # Hashes evicted since the last drain_evicted() (bounded: a reader that lags
        # loses the oldest entries, which only makes its view of the cache stale).
        self._evicted: deque[int] = deque(maxlen=4 * num_blocks)
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (evictable cached blocks included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence uses."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix block (in use or evictable)."""
        return len(self._block_of)

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks that still hold a cached prefix block."""
        return len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def match_prefix(self, token_ids, max_blocks: int | None = None) -> list[int]:
        """The cached blocks holding the longest prefix of ``token_ids`` (full blocks only,
        at most ``max_blocks``); empty when caching is off. Read-only."""
        if not self.enable_caching or not self._block_of:
            return []
        n = len(token_ids) // self.block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        out: list[int] = []
        for h in block_hashes(token_ids, self.block_size, n * self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def can_allocate(self, num_tokens: int, cached: list[int] = ()) -> bool:
        """Would ``allocate(.., num_tokens, cached)`` succeed?"""
        reused_free = sum(1 for b in cached if self._ref[b] == 0)
        return self.blocks_for(num_tokens) - len(cached) <= self.num_free_blocks - reused_free

    def allocate(self, seq_id: str, num_tokens: int, cached: list[int] = ()) -> list[int]:
        """Give a new sequence blocks for ``num_tokens`` tokens; returns its table.

        ``cached`` (from ``match_prefix``): blocks already holding its leading full blocks'
        KV; they are shared, and only the rest of the table is taken from the free blocks.
        """
        if seq_id in self._tables:
            raise BlockManagerError(f"sequence {seq_id!r} already has blocks")
        if not self.can_allocate(num_tokens, cached):
            raise BlockManagerError(f"no space for {num_tokens} tokens of {seq_id!r}")
        if len(cached) > self.blocks_for(num_tokens):
            raise BlockManagerError(f"{len(cached)} cached blocks exceed {num_tokens} tokens")
        table = list(cached)
        for b in table:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        if table:
            self._hashed[seq_id] = (len(table), self._hash_of[table[-1]])
        table += [self._take() for _ in range(self.blocks_for(num_tokens) - len(table))]
        self._tables[seq_id] = table
        return table

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Can the sequence's table grow to cover ``num_tokens`` tokens?"""
        missing = self.blocks_for(num_tokens) - len(self._table(seq_id))
        return missing <= self.num_free_blocks

    def append(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the table to cover ``num_tokens`` tokens; returns the blocks added."""
        table = self._table(seq_id)
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > self.num_free_blocks:
            raise BlockManagerError(f"no space to grow {seq_id!r} to {num_tokens} tokens")
        added = [self._take() for _ in range(max(missing, 0))]
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
        if missing > len(self._free) + len(self._evictable):
            return False
        table.extend([self._take() for _ in range(missing)])
        return True

    def cache_blocks(self, seq_id: str, token_ids, num_computed: int) -> None:
        """Register the sequence's full blocks among its first ``num_computed`` tokens, whose
        KV is written. A block whose hash another block already holds stays unregistered
        (the cache keeps one copy). No-op when caching is off."""
        if not self.enable_caching:
            return
        table = self._table(seq_id)
        done, parent = self._hashed.get(seq_id, (0, ROOT_HASH))
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return
        for i, h in enumerate(block_hashes(token_ids, self.block_size, full * self.block_size,
                                           start=done, parent=parent), start=done):
            block = table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
            parent = h
        self._hashed[seq_id] = (full, parent)

    def free(self, seq_id: str) -> None:
        table = self._table(seq_id)
        del self._tables[seq_id]
        self._hashed.pop(seq_id, None)
        if not self.enable_caching:
            for b in table:
                self._ref[b] -= 1
            self._free.extend(table)
            return
        uncached = []
        for b in reversed(table):  # tail first: a chain's later blocks are evicted first
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    uncached.append(b)
        self._free.extend(reversed(uncached))

    def drain_evicted(self) -> list[int]:
        """Hashes evicted from the cache since the previous call."""
        out = list(self._evicted)
        self._evicted.clear()
        return out

    def check_invariants(self) -> None:
        """Every block is free, evictable or used, exactly once, with a matching reference
        count; the cache's maps agree (used by tests, the KV audit and debug checks)."""
        uses = [0] * self.num_blocks
        for t in self._tables.values():
            for b in t:
                uses[b] += 1
        free, evictable = list(self._free), list(self._evictable)
        all_ids = sorted(free + evictable + [b for b in range(self.num_blocks) if uses[b]])
        if all_ids != list(range(self.num_blocks)):
            raise BlockManagerError("block accounting is corrupt (leak or double ownership)")
        if uses != self._ref:
            bad = [b for b in range(self.num_blocks) if uses[b] != self._ref[b]][:5]
            raise BlockManagerError(f"reference counts disagree with the tables at blocks {bad}")
        if any(b in self._hash_of for b in free) or any(b not in self._hash_of for b in evictable):
            raise BlockManagerError("a free block is cached or an evictable block is not")
        if any(self._block_of.get(h) != b for b, h in self._hash_of.items()) \
                or len(self._block_of) != len(self._hash_of):
            raise BlockManagerError("prefix cache maps disagree")

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            h = self._hash_of.pop(block)
            del self._block_of[h]
            self._evicted.append(h)
            self.num_evictions += 1
        self._ref[block] = 1
        return block

    def _table(self, seq_id: str) -> list[int]:
        if seq_id not in self._tables:
            self._unknown(seq_id)
        return self._tables[seq_id]

    def _unknown(self, seq_id: str):
        raise BlockManagerError(f"sequence {seq_id!r} has no blocks")
