"""Placement by prefix: the router's record (PrefixIndex) and the balance rule, under every
built-in policy, on synthetic loads (no Ray)."""

from __future__ import annotations

import pytest

from adrenaline import ConfigError, SamplingParams
from adrenaline.engine.block_hash import block_hashes
from adrenaline.policy import ClusterLoad, make_policy
from adrenaline.policy.prefix import PrefixIndex
from adrenaline.policy.profile import ClusterProfile
from adrenaline.protocol import GenerateRequest

BS = 16
HISTORY = list(range(100, 100 + 10 * BS))  # 10 full blocks


def _req(prompt: list[int], max_tokens: int = 50) -> GenerateRequest:
    return GenerateRequest(request_id="r", prompt_token_ids=prompt,
                           params=SamplingParams(max_tokens=max_tokens))


def _load(n_p: int = 2, inflight=None, queued=None) -> ClusterLoad:
    return ClusterLoad(prefill_inflight=list(inflight or [0] * n_p), decode_active=[0],
                       decode_reserved_tokens=[0], decode_capacity_tokens=[100_000],
                       decode_pending_tokens=[0], executor_active=[0] * n_p,
                       executor_reserved_tokens=[0] * n_p,
                       executor_capacity_tokens=[100_000] * n_p,
                       prefill_prefix=[PrefixIndex(1000, BS) for _ in range(n_p)],
                       prefill_queued_tokens=list(queued or [0] * n_p))


def _profile() -> ClusterProfile:
    return ClusterProfile(base_step_s={1: 0.01, 8: 0.02, 64: 0.2},
                          decode_attn_s_per_token=[1e-7], executor_attn_s_per_token=[1e-7, 1e-7],
                          exchange_s=0.0, decode_capacity_tokens=[100_000],
                          executor_capacity_tokens=[100_000, 100_000], kv_bytes_per_token=1000)


def test_index_matches_leading_chain_and_forgets_lru_and_evicted():
    idx = PrefixIndex(capacity_blocks=12, block_size=BS)
    hashes = block_hashes(HISTORY, BS)
    idx.add(hashes)
    assert idx.match(hashes) == 10
    idx.remove([hashes[4]])  # the instance reported it evicted
    assert idx.match(hashes) == 4
    idx.add(block_hashes(list(range(5000, 5000 + 5 * BS)), BS))  # 14 > 12: LRU goes
    assert len(idx) == 12 and idx.match(hashes) == 0  # the oldest (head) hashes went


@pytest.mark.parametrize("name,options", [("least_loaded", {}), ("static", {"ratio": 0.0}),
                                          ("load_aware", {})])
def test_every_policy_follows_the_prefix(name, options):
    policy = make_policy(name, options, _profile())
    load = _load(inflight=[0, 1])  # least loaded alone would pick prefill 0
    load.prefill_prefix[1].add(block_hashes(HISTORY, BS))
    req = _req(HISTORY + [7] * 20)
    assert load.cached_prefix_tokens(req) == [0, 10 * BS]
    assert policy.place(req, load).prefill == 1
    assert make_policy(name, {**options, "prefix_placement": False},
                       _profile()).place(req, load).prefill == 0


def test_static_offloaded_follows_the_prefix_among_executors_with_room():
    policy = make_policy("static", {"ratio": 1.0})
    load = _load()
    load.prefill_prefix[1].add(block_hashes(HISTORY, BS))
    req = _req(HISTORY + [7] * 20)
    where = policy.place(req, load)
    assert where.offload and where.prefill == 1
    load.executor_reserved_tokens = [0, 100_000]  # executor 1 is full: its prefix can't help
    where = policy.place(req, load)
    assert where.offload and where.prefill == 0


def test_balance_rule_gives_up_the_prefix_when_its_queue_is_too_long():
    policy = make_policy("least_loaded")
    hashes = block_hashes(HISTORY, BS)
    req = _req(HISTORY + [7] * 20)  # 180 tokens, 160 cached on prefill 1: saves 160
    load = _load(queued=[0, 150])
    load.prefill_prefix[1].add(hashes)
    assert policy.place(req, load).prefill == 1  # 20 + 150 < 180 + 0
    load.prefill_queued_tokens = [0, 170]
    assert policy.place(req, load).prefill == 0  # 20 + 170 > 180
    always = make_policy("least_loaded", {"prefix_balance": 0})
    assert always.place(req, load).prefill == 1  # queues ignored
    with pytest.raises(ConfigError):
        make_policy("least_loaded", {"prefix_balance": -1})


def test_no_cached_prefix_keeps_the_policys_choice_and_one_token_is_computed():
    policy = make_policy("least_loaded")
    load = _load(inflight=[2, 0], queued=[0, 5000])
    assert policy.place(_req(HISTORY), load).prefill == 1  # nothing cached: least loaded
    load.prefill_prefix[0].add(block_hashes(HISTORY, BS))
    # The whole prompt cached: the instance still computes its last block.
    assert load.cached_prefix_tokens(_req(HISTORY)) == [9 * BS, 0]
    empty = ClusterLoad(prefill_inflight=[0, 0], decode_active=[0], decode_reserved_tokens=[0],
                        decode_capacity_tokens=[1000])
    assert empty.cached_prefix_tokens(_req(HISTORY)) == [0, 0]  # caching off: no record
