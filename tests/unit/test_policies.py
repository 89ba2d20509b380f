"""Placement policies on synthetic loads and profiles."""

from __future__ import annotations

import pytest

from adrenaline import ConfigError, SamplingParams
from adrenaline.policy import ClusterLoad, make_policy
from adrenaline.policy.profile import ClusterProfile
from adrenaline.protocol import GenerateRequest


def _req(prompt_len: int = 100, max_tokens: int = 100) -> GenerateRequest:
    return GenerateRequest(request_id="r", prompt_token_ids=[1] * prompt_len,
                           params=SamplingParams(max_tokens=max_tokens))


def _load(decode_reserved=0, decode_active=0, exec_reserved=(0,), exec_cap=(10_000,),
          decode_cap=1000) -> ClusterLoad:
    n = len(exec_cap)
    return ClusterLoad(prefill_inflight=[0] * n, decode_active=[decode_active],
                       decode_reserved_tokens=[decode_reserved], decode_capacity_tokens=[decode_cap],
                       decode_pending_tokens=[0],
                       executor_active=[0] * n, executor_reserved_tokens=list(exec_reserved),
                       executor_capacity_tokens=list(exec_cap))


def _profile(step_ms=None, exec_cap=(10_000,), decode_cap=1000, exec_bw=(20.0,), dec_bw=20.0):
    step_ms = step_ms or {1: 10, 8: 20, 16: 40, 32: 90, 64: 200}
    return ClusterProfile(step_time_s={b: t / 1e3 for b, t in step_ms.items()},
                          decode_bandwidth_gbs=[dec_bw], executor_bandwidth_gbs=list(exec_bw),
                          decode_capacity_tokens=[decode_cap],
                          executor_capacity_tokens=list(exec_cap))


def _decide(policy, req, load):
    """Arrival then admission, as the router asks them."""
    return policy.admit(req, policy.place(req, load), load)


def test_none_never_offloads_balances_and_waits_for_room():
    policy = make_policy("none")
    load = _load()
    load.prefill_inflight = [3, 1]
    load.executor_capacity_tokens = [10_000, 10_000]
    load.executor_reserved_tokens = [0, 0]
    where = _decide(policy, _req(), load)
    assert where.prefill == 1 and not where.offload
    assert _decide(policy, _req(), _load(decode_reserved=900)) is None  # waits for KV room


def test_static_ratio_offloads_that_fraction_within_capacity():
    policy = make_policy("static", {"ratio": 0.25})
    decisions = [_decide(policy, _req(), _load()).offload for _ in range(8)]
    assert decisions.count(True) == 2
    full = make_policy("static", {"ratio": 1.0})
    assert _decide(full, _req(), _load()).offload
    # The executor cannot hold 200 more tokens yet: the request waits for it.
    assert _decide(full, _req(), _load(exec_reserved=(9_900,))) is None
    with pytest.raises(ConfigError, match="ratio"):
        make_policy("static", {"ratio": 1.5})


def test_static_offloads_onto_its_own_prefill_instance():
    policy = make_policy("static", {"ratio": 1.0})
    load = _load(exec_reserved=(9_000, 100), exec_cap=(10_000, 10_000))
    where = _decide(policy, _req(), load)
    assert where.offload and where.prefill == 1  # the executor with room; prefill beside it


def test_load_aware_bound_and_admission():
    # B_max at a 100 ms SLO is 32 (a 90 ms step); 64 takes 200 ms.
    policy = make_policy("load_aware", {"tpot_slo_ms": 100}, _profile())
    assert policy.b_max == 32
    # OB_mem = min(10000/1000, 20/20) = 1; B_tpot = 1000 // 200 = 5; OB_comp = (32-5)/5 = 5.4.
    assert policy.offload_bound(200, 1000) == pytest.approx(1.0)
    # Local KV has room: stay local.
    assert not _decide(policy, _req(), _load(decode_reserved=700)).offload
    # Local KV full: offload while offloaded load stays within OB x 1000 tokens; else wait.
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5)).offload
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5,
                                         exec_reserved=(900,))) is None
    # The decode batch would pass B_max: wait (for local KV) instead.
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=32)) is None


def test_load_aware_compute_bound_limits_offload():
    # A slow decode: B_max = 8 at a 25 ms SLO; B_tpot = 5 -> OB_comp = 0.6 < OB_mem = 2.
    policy = make_policy("load_aware", {"tpot_slo_ms": 25}, _profile(exec_bw=(40.0,)))
    assert policy.b_max == 8
    assert policy.offload_bound(200, 1000) == pytest.approx(0.6)
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5,
                                         exec_reserved=(300,))).offload
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5,
                                         exec_reserved=(500,))) is None


def test_load_aware_requires_a_profile():
    with pytest.raises(ValueError, match="profile"):
        make_policy("load_aware", {})
