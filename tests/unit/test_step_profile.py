"""The start-up profile's timings on a real (tiny) engine: sensible numbers, pools left empty."""

from __future__ import annotations

import torch

from adrenaline.config import EngineConfig
from adrenaline.engine.attention_service import AttentionService
from adrenaline.engine.core import EngineCore
from adrenaline.engine.step_profile import profile_decode, profile_executor_attention
from adrenaline.policy.profile import ClusterProfile, profile_batches


def test_profile_batches_reach_max_num_seqs():
    assert profile_batches(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert profile_batches(48) == [1, 2, 4, 8, 16, 32, 48]
    assert profile_batches(1) == [1]


def test_decode_profile_splits_base_and_attention_and_leaves_the_pool_empty():
    engine = EngineCore("tiny", dtype="float32", device="cpu",
                        config=EngineConfig(kv_cache_tokens=8192, max_num_seqs=16,
                                            num_threads=1))
    base, per_token = profile_decode(engine, profile_batches(16), long_context=1024)
    assert sorted(base) == [1, 2, 4, 8, 16] and all(t > 0 for t in base.values())
    assert per_token > 0
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    # A small pool: fewer requests at a shorter context, still a measurement.
    small = EngineCore("tiny", dtype="float32", device="cpu",
                       config=EngineConfig(kv_cache_tokens=128, max_num_seqs=16, num_threads=1))
    base, per_token = profile_decode(small, profile_batches(16))
    assert base and per_token >= 0 and small.block_manager.num_used_blocks == 0


def test_executor_attention_profile_runs_attention_and_frees():
    probe = EngineCore("tiny", dtype="float32", device="cpu",
                       config=EngineConfig(kv_cache_tokens=64))
    service = AttentionService(probe.model_config, EngineConfig(kv_cache_tokens=4096),
                               torch.float32, torch.device("cpu"))
    s = profile_executor_attention(service, num_requests=4, context=512)
    assert s > 0 and service.block_manager.num_used_blocks == 0 and not service.ids
    prof = ClusterProfile({1: 0.01}, [s], [s], 0.0, [1000], [1000], kv_bytes_per_token=100)
    assert prof.executor_bandwidth_gbs[0] == prof.decode_bandwidth_gbs[0] > 0


def test_scattered_free_blocks_are_the_same_blocks_in_another_order_until_exit():
    from adrenaline.engine.block_manager import BlockManager
    from adrenaline.engine.synthetic_batch import scattered_free_blocks, served_contexts

    bm = BlockManager(64, 16)
    bm.allocate("kept", 100)  # 7 blocks in use stay in use
    with scattered_free_blocks(bm, seed=1):
        assert bm.num_free_blocks == 57 and bm.block_table("kept") == list(range(7))
        bm.check_invariants()
        table = bm.allocate("inside", 16 * 8)
        assert sorted(table) != table and set(table) <= set(range(7, 64))  # scattered
        bm.free("inside")
    bm.check_invariants()
    assert bm.allocate("after", 16 * 57) == list(range(7, 64))  # the order before
    assert served_contexts(4, 2048) == [512, 1024, 1536, 2048]


def test_the_decode_profile_leaves_the_free_blocks_consecutive():
    engine = EngineCore("tiny", dtype="float32", device="cpu",
                        config=EngineConfig(kv_cache_tokens=4096, max_num_seqs=8,
                                            num_threads=1))
    profile_decode(engine, profile_batches(8), long_context=512)
    bm = engine.block_manager
    # Freed requests return their blocks to the back of the free list in table order, so
    # it is runs of consecutive blocks (a few breaks), not the scattered order the
    # attention was timed on (a break at nearly every block).
    table = bm.allocate("after", bm.num_free_blocks * bm.block_size)
    breaks = sum(b != a + 1 for a, b in zip(table, table[1:]))
    assert breaks <= 16, breaks
