"""Placement policies on synthetic loads and profiles."""

from __future__ import annotations

import pytest

from adrenaline import ConfigError, SamplingParams
from adrenaline.policy import ClusterLoad, Placement, PlacementPolicy, make_policy
from adrenaline.policy.profile import ClusterProfile
from adrenaline.protocol import GenerateRequest


def _req(prompt_len: int = 100, max_tokens: int = 100) -> GenerateRequest:
    return GenerateRequest(request_id="r", prompt_token_ids=[1] * prompt_len,
                           params=SamplingParams(max_tokens=max_tokens))


def _load(decode_reserved=0, decode_active=0, exec_reserved=(0,), exec_cap=(10_000,),
          decode_cap=1000, decode_mean=None, exec_mean=None) -> ClusterLoad:
    """Without ``decode_mean``/``exec_mean`` (the life-mean sums) the time rules read the
    reserved sums."""
    n = len(exec_cap)
    return ClusterLoad(prefill_inflight=[0] * n, decode_active=[decode_active],
                       decode_reserved_tokens=[decode_reserved], decode_capacity_tokens=[decode_cap],
                       decode_pending_tokens=[0],
                       executor_active=[0] * n, executor_reserved_tokens=list(exec_reserved),
                       executor_capacity_tokens=list(exec_cap),
                       decode_mean_tokens=[] if decode_mean is None else [decode_mean],
                       executor_mean_tokens=[] if exec_mean is None else list(exec_mean))


def _profile(base_ms=None, exec_cap=(10_000,), decode_cap=1000, exec_us=(10.0,), dec_us=10.0,
             exchange_ms=0.0):
    """Base step by batch (ms), attention per KV token (us) on decode and executors."""
    base_ms = base_ms or {1: 5, 8: 10, 16: 20, 32: 40, 64: 80}
    return ClusterProfile(base_step_s={b: t / 1e3 for b, t in base_ms.items()},
                          decode_attn_s_per_token=[dec_us / 1e6],
                          executor_attn_s_per_token=[u / 1e6 for u in exec_us],
                          exchange_s=exchange_ms / 1e3,
                          decode_capacity_tokens=[decode_cap],
                          executor_capacity_tokens=list(exec_cap), kv_bytes_per_token=1000)


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


def test_profile_splits_the_step_into_base_and_attention():
    prof = _profile()
    assert prof.base_s(8) == pytest.approx(0.010)
    assert prof.base_s(12) == pytest.approx(0.015)  # between profiled batches: linear
    assert prof.base_s(128) == pytest.approx(0.160)  # past the last: its slope
    # 16 requests of 500 tokens: 20 ms base + 8000 tokens x 10 us = 100 ms.
    assert prof.step_s(16, 8000) == pytest.approx(0.100)
    # B_max depends on the local KV read, not on a fixed short context.
    assert prof.b_max(0.100, 0) == 64  # capped at the largest profiled batch
    assert prof.b_max(0.100, 8000) == 16
    assert prof.b_max(0.030, 1000) == 16  # 20 ms + 10 ms
    assert prof.executor_bandwidth_gbs == [pytest.approx(0.1)]  # 1000 B per 10 us


def test_load_aware_bound_and_admission():
    # 100 ms SLO; requests of 100 + 100 tokens: 200 at most, 150 over their lives.
    # B_tpot = 1000 // 200 = 5, whose attention reads 5 x 150 = 750 tokens (7.5 ms):
    # B_max = 64 (80 + 7.5 ms); OB_comp = (64-5)/5; OB_mem = min(10000/1000, 1) = 1.
    policy = make_policy("load_aware", {"tpot_slo_ms": 100}, _profile())
    assert policy.offload_bound(200, 150, 1000) == pytest.approx(1.0)
    # Local KV has room: stay local.
    assert not _decide(policy, _req(), _load(decode_reserved=700)).offload
    # Local KV full: offload while the offloaded load stays within OB x 1000 tokens and the
    # executor's attention over it hides behind the local one (900 local tokens here).
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5)).offload
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=5,
                                         exec_reserved=(900,))) is None
    # The decode batch would pass B_max: wait (for local KV) instead.
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=64)) is None


def test_load_aware_keeps_remote_attention_hidden():
    # A generous bound (fast executor KV, big OB); only rule (d) decides.
    policy = make_policy("load_aware", {"tpot_slo_ms": 1000},
                         _profile(exec_us=(20.0,), exchange_ms=1.0))
    # Local attention: 900 tokens x 10 us = 9 ms. Remote: 1 ms + (tokens) x 20 us, this
    # request adding its life mean (150 tokens).
    def load(exec_mean):
        return _load(decode_reserved=900, decode_active=5, exec_reserved=(exec_mean,),
                     decode_mean=900, exec_mean=(exec_mean,))
    assert _decide(policy, _req(), load(0)).offload  # 1 + 3 = 4 ms <= 9 ms
    assert _decide(policy, _req(), load(250)).offload  # 1 + 8 = 9 ms: still hidden
    # 300 + 150: 1 + 9 = 10 ms > 9 ms: the step would wait on the executor: wait instead.
    assert _decide(policy, _req(), load(300)) is None


def test_load_aware_compute_bound_limits_offload():
    # A slow decode base: at a 28 ms SLO with 5 x 150 = 750 local tokens read (7.5 ms),
    # B_max = 16 (20 ms; 17 would be 21.25); OB_comp = (16-5)/5 = 2.2 > OB_mem =
    # min(10, 10/5 = 2) = 2 -> OB = 2.
    policy = make_policy("load_aware", {"tpot_slo_ms": 28}, _profile(exec_us=(5.0,)))
    assert policy.offload_bound(200, 150, 1000) == pytest.approx(2.0)
    # The batch at 16 stops it whatever the KV says.
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=16,
                                         decode_mean=750, exec_mean=(0,))) is None
    assert policy.b_max == 16  # the bound of that decision, as /metrics shows it
    assert _decide(policy, _req(), _load(decode_reserved=900, decode_active=15,
                                         decode_mean=750, exec_mean=(0,))).offload


def test_load_aware_times_steps_at_life_means():
    # A step's attention is counted at the KV requests hold over their lives, not at
    # their maximum: 16 local requests of 100 + 1,900 tokens reserve 32,000 tokens
    # (320 ms of attention at 10 us/token) but read 16 x 1,050 = 16,800 on average (168 ms).
    policy = make_policy("load_aware", {"tpot_slo_ms": 250},
                         _profile(exec_cap=(32_000,), decode_cap=32_000))
    req = _req(100, 1900)
    assert policy.request_mean_tokens(req) == 1050
    load = _load(decode_reserved=32_000, decode_active=16, exec_cap=(32_000,),
                 decode_cap=32_000)
    # At maximum lengths (no mean sums) no batch fits a 250 ms step: B_max = 1, it waits.
    assert _decide(policy, req, load) is None and policy.b_max == 1
    # At the life means 168 ms of attention leave 82 ms for the base: B_max = 64.
    load.decode_mean_tokens, load.executor_mean_tokens = [16_800], [0]
    assert _decide(policy, req, load).offload and policy.b_max == 64
    # The executor's attention over 15 x 1,050 already + 1,050 = 168 ms: still hidden; one
    # more (178.5 ms) would make the step wait on it.
    load.executor_mean_tokens, load.executor_reserved_tokens = [15 * 1050], [15 * 2000]
    assert _decide(policy, req, load).offload
    load.executor_mean_tokens, load.executor_reserved_tokens = [16 * 1050], [16 * 2000]
    assert _decide(policy, req, load) is None


def test_a_policy_declares_it_needs_the_profile():
    from adrenaline.policy import needs_profile

    assert needs_profile("load_aware") and not needs_profile("static")
    assert needs_profile("tests.unit.test_policies:ProfiledPolicy")


class ProfiledPolicy(PlacementPolicy):
    """A user's policy ("module:Class") that asks for the start-up profile."""

    needs_profile = True

    def place(self, req, load):
        return Placement(prefill=0, decode=0)


def test_load_aware_requires_a_profile():
    with pytest.raises(ValueError, match="profile"):
        make_policy("load_aware", {})


def test_step_feedback_scales_the_model_by_served_steps():
    from adrenaline.policy.step_feedback import MIN_STEPS, WEIGHT, StepFeedback

    prof = _profile()
    fb = StepFeedback(prof, 1)
    fb.observe(0, 0, 0.0, 0, 0)  # first sight: nothing to compare yet
    assert fb.scale == [1.0]
    # 10 steps of batch 16 reading 8,000 local tokens each: modeled 100 ms; served 150 ms.
    fb.observe(0, 10, 1.5, 160, 80_000)
    assert fb.scale[0] == pytest.approx(1.5)  # the first measurement is taken whole
    fb.observe(0, 10 + MIN_STEPS - 1, 9.9, 999, 999)  # too few steps since: ignored
    assert fb.scale[0] == pytest.approx(1.5)
    # 10 more at batch 8 and no local KV (modeled 10 ms), served in 10 ms: ratio 1.0.
    fb.observe(0, 20, 1.6, 240, 80_000)
    assert fb.scale[0] == pytest.approx(1.5 + WEIGHT * (1.0 - 1.5))
    # A replaced worker's counters start again: the next observation is a first sight.
    before = fb.scale[0]
    fb.observe(0, 3, 0.3, 24, 0)
    assert fb.scale[0] == before
    fb.observe(0, 13, 100.3, 104, 0)  # 10 s steps: a ratio past the bounds is clamped
    assert fb.scale[0] == pytest.approx(before + WEIGHT * (4.0 - before))


def test_load_aware_holds_the_slo_by_the_served_step():
    # 100 ms SLO, 8,000 local tokens read (80 ms): B_max 16 by the profile (20 + 80 ms).
    # Served steps 25% longer than modeled: only batches whose modeled step is within
    # 80 ms fit, none here (the base at 1 is 5 ms + 80 ms): B_max falls to 1.
    req = _req(100, 1900)
    load = _load(decode_reserved=900, decode_active=3, decode_mean=8000, exec_mean=(0,),
                 exec_cap=(100_000,))
    policy = make_policy("load_aware", {"tpot_slo_ms": 100},
                         _profile(exec_cap=(100_000,), exec_us=(0.1,)))
    assert _decide(policy, req, load).offload and policy.b_max == 16
    policy.observe_decode_steps(0, 0, 0.0, 0, 0)
    policy.observe_decode_steps(0, 10, 10 * 0.125, 160, 80_000)
    assert policy.step_scale(0) == pytest.approx(1.25)
    assert _decide(policy, req, load) is None and policy.b_max == 1
    # A 7,000-token local read (70 ms) leaves 10 ms of the 80 for the base: B_max 8.
    load.decode_mean_tokens = [7000]
    assert _decide(policy, req, load).offload and policy.b_max == 8
    # step_feedback false: the profile's model as it is.
    plain = make_policy("load_aware", {"tpot_slo_ms": 100, "step_feedback": False},
                        _profile(exec_cap=(100_000,), exec_us=(0.1,)))
    plain.observe_decode_steps(0, 0, 0.0, 0, 0)
    plain.observe_decode_steps(0, 10, 10 * 0.125, 160, 80_000)
    assert plain.step_scale(0) == 1.0
    load.decode_mean_tokens = [8000]
    assert _decide(plain, req, load).offload and plain.b_max == 16
