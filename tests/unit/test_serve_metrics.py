"""Prometheus gauges of serve/metrics.py that the sweep samples: offload ratio, KV usage."""

from __future__ import annotations

import math

import pytest

from prometheus_client.parser import text_string_to_metric_families

from adrenaline.protocol import WorkerMetrics
from adrenaline.serve.metrics import IngressMetrics, offload_ratio


def _w(role: str, index: int, running: int, offloaded: int = 0, used: int = 0, total: int = 8):
    return WorkerMetrics(role=role, index=index, num_running=running, num_waiting=0,
                         kv_blocks_used=used, kv_blocks_total=total, num_offloaded=offloaded)


def _samples(m: IngressMetrics) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_offload_ratio_counts_decode_workers_only():
    workers = [_w("decode", 0, running=3, offloaded=1), _w("decode", 1, running=1, offloaded=1),
               _w("executor", 0, running=9), _w("prefill", 0, running=5)]
    assert offload_ratio(workers) == 0.5  # (1 + 1) / (3 + 1); executor and prefill ignored
    assert offload_ratio([_w("decode", 0, running=0), _w("executor", 0, running=2)]) == 0.0


def test_gauges_follow_each_poll():
    m = IngressMetrics()
    m.set_workers([_w("decode", 0, running=4, offloaded=3, used=2, total=8),
                   _w("executor", 0, running=3, used=6, total=8)])
    s = _samples(m)
    assert s[("adrenaline_offload_ratio", ())] == 0.75
    assert s[("adrenaline_worker_kv_usage_ratio", (("index", "0"), ("role", "decode")))] == 0.25
    assert s[("adrenaline_worker_kv_usage_ratio", (("index", "0"), ("role", "executor")))] == 0.75
    m.set_workers([_w("decode", 0, running=2, offloaded=0)])
    s = _samples(m)
    assert s[("adrenaline_offload_ratio", ())] == 0.0
    assert ("adrenaline_worker_kv_usage_ratio", (("index", "0"), ("role", "executor"))) not in s
    m.set_workers(None)  # a failed poll: unknown, not 0
    assert math.isnan(_samples(m)[("adrenaline_offload_ratio", ())])


def test_prefix_cache_gauges_per_prefill_instance():
    m = IngressMetrics()
    m.set_workers([WorkerMetrics(role="prefill", index=1, num_running=0, num_waiting=0,
                                 kv_blocks_used=0, kv_blocks_total=8, prefill_tokens=400,
                                 prefix_cached_tokens=300, kv_blocks_cached=5),
                   _w("prefill", 0, running=0), _w("decode", 0, running=1)])
    s = _samples(m)
    p1, p0 = (("index", "1"), ("role", "prefill")), (("index", "0"), ("role", "prefill"))
    assert s[("adrenaline_worker_prefix_cache_hit_ratio", p1)] == 0.75
    assert s[("adrenaline_worker_prefix_cache_hit_tokens", p1)] == 300
    assert s[("adrenaline_worker_prefix_cache_prefill_tokens", p1)] == 400
    assert s[("adrenaline_worker_kv_blocks_cached", p1)] == 5
    assert s[("adrenaline_worker_prefix_cache_hit_ratio", p0)] == 0.0  # nothing prefilled yet
    assert ("adrenaline_worker_kv_blocks_cached", (("index", "0"), ("role", "decode"))) not in s


def test_policy_gauges_show_the_step_scale_per_decode_instance():
    m = IngressMetrics()
    stats = {"num_placed": 5, "num_offloaded": 2, "b_max": 30, "ob_mem": 1.0,
             "step_scale": [1.25, 0.9], "profile": None}
    m.policy.set_stats(stats)
    s = _samples(m)
    assert s[("adrenaline_policy_step_scale", (("decode", "0"),))] == 1.25
    assert s[("adrenaline_policy_step_scale", (("decode", "1"),))] == 0.9
    assert s[("adrenaline_policy_b_max", ())] == 30
    m.policy.set_stats({**stats, "step_scale": None})  # a policy without it
    assert not any(k[0] == "adrenaline_policy_step_scale" for k in _samples(m))


def test_the_policy_bounds_and_profile_go_when_the_router_does_not_answer():
    m = IngressMetrics()
    profile = {"base_step_ms": {16: 40.0}, "decode_attn_us_per_token": [2.0],
               "executor_attn_us_per_token": [2.1], "decode_bandwidth_gbs": [5.0],
               "executor_bandwidth_gbs": [4.8], "exchange_ms": 3.0}
    m.policy.set_stats({"num_placed": 5, "num_offloaded": 2, "b_max": 30, "ob_mem": 1.0,
                        "step_scale": [1.1], "profile": profile})
    s = _samples(m)
    assert s[("adrenaline_profile_exchange_seconds", ())] == pytest.approx(3e-3)
    assert s[("adrenaline_policy_b_max", ())] == 30
    m.policy.set_stats(None)  # a failed stats() call: the bounds are unknown, not stale
    s = _samples(m)
    for name in ("adrenaline_policy_b_max", "adrenaline_policy_ob_mem",
                 "adrenaline_profile_exchange_seconds", "adrenaline_policy_step_scale",
                 "adrenaline_profile_base_step_seconds"):
        assert not any(k[0] == name for k in s), name
    assert s[("adrenaline_policy_placed_requests", ())] == 5  # cumulative: kept
