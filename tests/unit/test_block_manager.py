"""Exact block ids and leak-free accounting of the BlockManager."""

from __future__ import annotations

import random

import pytest

from adrenaline.engine.block_manager import BlockManager, BlockManagerError


def test_allocate_append_free_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert bm.allocate("b", 4) == [2]
    assert bm.append("a", 8) == []  # still fits in 2 blocks
    assert bm.append("a", 9) == [3]
    assert bm.block_table("a") == [0, 1, 3]
    bm.free("a")  # back of the free list, in table order
    assert bm.num_free_blocks == 7
    assert bm.allocate("c", 16) == [4, 5, 6, 7]
    assert bm.allocate("d", 9) == [0, 1, 3]
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_can_allocate_and_can_append_limits():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.can_allocate(12) and not bm.can_allocate(13)
    bm.allocate("a", 8)
    assert bm.can_append("a", 12) and not bm.can_append("a", 13)
    with pytest.raises(BlockManagerError):
        bm.append("a", 13)
    with pytest.raises(BlockManagerError):
        bm.allocate("b", 5)
    assert bm.block_table("a") == [0, 1]  # failed calls changed nothing
    bm.check_invariants()


def test_misuse_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 1)
    with pytest.raises(BlockManagerError):
        bm.allocate("a", 1)
    with pytest.raises(BlockManagerError):
        bm.free("nope")
    with pytest.raises(BlockManagerError):
        bm.append("nope", 3)


def test_random_history_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    lens: dict[str, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 20)
            if bm.can_allocate(n):
                bm.allocate(f"s{step}", n)
                lens[f"s{step}"] = n
        elif op < 0.8 and lens:
            sid = rng.choice(sorted(lens))
            if bm.can_append(sid, lens[sid] + 1):
                bm.append(sid, lens[sid] + 1)
                lens[sid] += 1
        elif lens:
            sid = rng.choice(sorted(lens))
            bm.free(sid)
            del lens[sid]
        bm.check_invariants()
        for sid, n in lens.items():
            assert len(bm.block_table(sid)) == bm.blocks_for(n)
    for sid in list(lens):
        bm.free(sid)
    assert bm.num_free_blocks == 32
    bm.check_invariants()
