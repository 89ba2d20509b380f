"""Prefix caching: block sharing and eviction (exact block ids), the scheduler's cached
prefill, and greedy outputs identical with caching on and off (offline LLM, prefill role)."""

from __future__ import annotations

import pytest

from adrenaline import LLM, SamplingParams
from adrenaline.engine.block_hash import block_hashes
from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.kv_audit import audit_kv
from adrenaline.engine.request import Request
from adrenaline.engine.scheduler import Scheduler

BS = 4


def _bm(n: int = 8) -> BlockManager:
    return BlockManager(num_blocks=n, block_size=BS, enable_caching=True)


def _run(bm: BlockManager, seq: str, tokens: list[int]) -> list[int]:
    """Allocate with the cached prefix, 'compute' the rest, register the full blocks."""
    cached = bm.match_prefix(tokens, (len(tokens) - 1) // BS)
    table = bm.allocate(seq, len(tokens), cached)
    bm.cache_blocks(seq, tokens, len(tokens))
    return table


def test_hash_chain_depends_on_the_whole_prefix():
    a = block_hashes(list(range(12)), BS)
    b = block_hashes([99] + list(range(1, 12)), BS)
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1] and a[2] != b[2]  # same blocks 2, 3
    assert block_hashes(list(range(10)), BS) == a[:2]  # partial last block: no hash


def test_shared_prefix_is_reference_counted_and_cancel_keeps_shared_blocks():
    bm = _bm()
    a = _run(bm, "a", list(range(10)))  # blocks 0, 1 full (cached), 2 partial
    b = _run(bm, "b", list(range(8)) + [50, 51, 52])  # shares blocks 0, 1
    assert b[:2] == a[:2] and b[2] not in a
    assert [bm.ref_count(x) for x in a[:2]] == [2, 2]
    bm.free("a")  # a cancelled request: its shared blocks stay with b
    assert [bm.ref_count(x) for x in b] == [1, 1, 1]
    bm.allocate("c", bm.num_free_blocks * BS)  # takes every free block, evicting if needed
    assert not set(bm.block_table("c")) & set(b)
    bm.check_invariants()
    report = audit_kv("prefill", 0, bm, {"b", "c"})
    assert report.ok and report.num_used == bm.num_blocks


def test_freed_blocks_stay_cached_and_are_evicted_lru_only_when_needed():
    bm = _bm(6)
    t1, t2 = list(range(100, 108)), list(range(200, 208))
    _run(bm, "x", t1)
    _run(bm, "y", t2)
    bm.free("x")
    bm.free("y")
    assert bm.num_free_blocks == 6 and bm.num_evictable_blocks == 4 and bm.num_cached_blocks == 4
    # Two uncached free blocks exist: a 2-block request evicts nothing.
    bm.allocate("z", 8)
    assert bm.num_cached_blocks == 4 and bm.drain_evicted() == []
    # Memory needed: the least recently freed chain (x) goes first, its tail block first.
    bm.allocate("w", 4)
    x_hashes = block_hashes(t1, BS)
    assert bm.drain_evicted() == [x_hashes[1]]
    assert bm.match_prefix(t1 + [1]) == bm.match_prefix(t1[:4])  # only x's head survives
    assert len(bm.match_prefix(t2 + [1])) == 2  # y untouched
    report = audit_kv("prefill", 0, bm, {"z", "w"})
    assert report.ok and report.num_cached == 3 and report.num_evictable == 3


def test_scheduler_computes_only_the_uncached_suffix_and_at_least_one_token():
    bm = _bm(16)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=4)
    first = Request("r0", list(range(1, 13)), params, arrival=0)  # 3 full blocks
    s.add(first)
    plan = s.schedule_prefill()
    assert plan.query_lens == [12] and plan.context_lens == [0]
    bm.cache_blocks("r0", first.token_ids, 12)
    s.finish(first)
    longer = Request("r1", list(range(1, 13)) + [77, 78], params, arrival=1)
    same = Request("r2", list(range(1, 13)), params, arrival=2)
    s.add(longer)
    s.add(same)
    plan = s.schedule_prefill()
    # r1: 12 cached, computes 2; r2: cached whole, recomputes its last block (>= 1 token).
    assert plan.query_lens == [2, 4] and plan.context_lens == [12, 8]
    assert s.num_cached_tokens == 20 and s.num_prefill_tokens == 12 + 14 + 12
    bm.check_invariants()


def _conversation(vocab: int, turns: int, seed: int) -> list[list[int]]:
    """Prompts of a multi-turn chat: each is the previous one plus new tokens."""
    import random

    rng = random.Random(seed)
    prompts, history = [], []
    for _ in range(turns):
        history = history + [rng.randrange(10, vocab - 10) for _ in range(rng.randrange(20, 45))]
        prompts.append(list(history))
    return prompts


@pytest.mark.parametrize("kv_tokens", [4096, 160])  # 160: eviction under memory pressure
def test_llm_greedy_identical_with_caching_on_and_off(kv_tokens):
    on = LLM("tiny", kv_cache_tokens=kv_tokens, block_size=BS)
    off = LLM("tiny", kv_cache_tokens=kv_tokens, block_size=BS, enable_prefix_caching=False)
    vocab = on.engine.model_config.vocab_size
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    convs = [_conversation(vocab, 3, seed) for seed in range(3)]
    for turn in range(3):  # turn k of every conversation in one batch, as a chat server sees it
        prompts = [c[turn] for c in convs]
        got, want = on.generate(prompts, params), off.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    sched, bm = on.engine.scheduler, on.engine.block_manager
    assert sched.num_cached_tokens > 0 and off.engine.scheduler.num_cached_tokens == 0
    if kv_tokens == 160:
        assert bm.num_evictions > 0
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_blocks > 0


def test_prefill_role_keeps_handed_off_blocks_cached():
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore

    e = EngineCore("tiny", config=EngineConfig(block_size=BS, kv_cache_tokens=512))
    params = SamplingParams(max_tokens=4, temperature=0)
    prompt = list(range(10, 40))  # 7 full blocks + 2 tokens
    e.add_request("a", prompt, params)
    e.prefill_step()
    kv_a = e.export_kv("a")
    e.release("a")
    assert e.block_manager.num_used_blocks == 0 and e.block_manager.num_cached_blocks == 7
    e.add_request("b", prompt + [41, 42], params)
    (b,) = e.prefill_step()
    assert b.num_cached_tokens == 28
    kv_b = e.export_kv("b")
    # The cached blocks hand off the same KV the first prefill computed.
    assert kv_b.shape[e.backend.block_dim + 1] == 8
    import torch
    assert torch.equal(kv_b.narrow(e.backend.block_dim + 1, 0, 7),
                       kv_a.narrow(e.backend.block_dim + 1, 0, 7))
    e.release("b")
    e.block_manager.check_invariants()


def test_colocated_local_and_offloaded_with_cache_hits_match_uncached():
    from adrenaline.config import EngineConfig
    from adrenaline.engine.colocated import ColocatedPD

    shared = list(range(50, 98))  # 3 full blocks of 16 shared by every prompt
    prompts = [shared + [200 + i, 300 + i, 400 + i] for i in range(4)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in
            LLM("tiny", enable_prefix_caching=False).generate(prompts, params)]
    pd = ColocatedPD("tiny", prefill=EngineConfig(kv_cache_tokens=2048),
                     decode=EngineConfig(kv_cache_tokens=1024),
                     executor=EngineConfig(kv_cache_tokens=1024))
    try:
        for _ in range(2):  # the second round's prefills all start from the cache
            got = pd.generate(prompts, params, offload=lambda i: i % 2 == 0)
            assert [r.output_token_ids for r in got] == want
        assert pd.prefill.scheduler.num_cached_tokens >= 4 * len(shared)
        assert pd.num_offloaded == 4  # 2 per round
        assert pd.blocks_in_use() == {"prefill": 0, "decode": 0, "executor": 0}
    finally:
        pd.close()
