"""`bench offload`'s decode figures over its saturated window (bench/offload_report.py)."""

from __future__ import annotations

import pytest

from adrenaline.bench.offload_report import saturated_worker_stats
from adrenaline.protocol import WorkerMetrics


def _decode(steps: int, batch_sum: int, step_s: float, offloaded: int, waits: int = 0,
            wait_s: float = 0.0) -> list[WorkerMetrics]:
    common = dict(index=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=8)
    return [WorkerMetrics(role="decode", num_running=10, num_steps=steps,
                          batch_size_sum=batch_sum, step_time_s=step_s, step_cpu_s=step_s / 2,
                          num_offloaded=offloaded, num_remote_waits=waits,
                          remote_wait_s=wait_s, **common),
            WorkerMetrics(role="prefill", num_running=1, num_steps=999, step_time_s=99.0,
                          **common)]


def test_only_the_samples_inside_the_window_count():
    samples = [(0.0, _decode(0, 0, 0.0, 0)),           # ramp: batch 4
               (1.0, _decode(10, 40, 1.0, 2)),
               (2.0, _decode(20, 240, 3.0, 6, 300, 0.6)),  # saturated: batch 20, 200 ms
               (3.0, _decode(30, 440, 5.0, 8, 600, 1.5)),
               (4.0, _decode(40, 480, 5.5, 0, 600, 1.5))]  # drain
    out = saturated_worker_stats(samples, [1.0, 3.0])
    assert out["saturated_decode_batch"] == pytest.approx(20.0)
    assert out["saturated_decode_step_ms"] == pytest.approx(200.0)
    assert out["saturated_decode_step_cpu_ms"] == pytest.approx(100.0)
    assert out["saturated_offloaded_requests"] == pytest.approx((2 + 6 + 8) / 3)
    assert out["saturated_remote_wait_per_layer_ms"] == pytest.approx(1e3 * 1.5 / 600)


def test_a_window_with_fewer_than_two_samples_or_no_step_gives_nothing():
    samples = [(0.0, _decode(0, 0, 0.0, 0)), (5.0, _decode(10, 40, 1.0, 0))]
    assert saturated_worker_stats(samples, [1.0, 4.0]) == {}
    assert saturated_worker_stats(samples[:1] * 2, [-1.0, 1.0]) == {}
    out = saturated_worker_stats(samples, [0.0, 5.0])
    assert "saturated_remote_wait_per_layer_ms" not in out  # no executor, no wait


def _with_executor(decode: list[WorkerMetrics], serve_cpu_s: float, busy_cpu_s: float,
                   napped_s: float) -> list[WorkerMetrics]:
    return decode + [WorkerMetrics(role="executor", index=0, num_running=3, num_waiting=0,
                                   kv_blocks_used=0, kv_blocks_total=8, busy_cpu_s=busy_cpu_s,
                                   serve_cpu_s=serve_cpu_s, napped_s=napped_s)]


def test_the_decodes_own_rate_and_the_executors_polling_over_the_window():
    samples = [(0.0, _with_executor(_decode(0, 0, 0.0, 0), 0.0, 0.0, 0.0)),
               (2.0, _with_executor(_decode(10, 200, 2.0, 5), 1.0, 0.4, 0.5)),
               (6.0, _with_executor(_decode(30, 600, 6.0, 5), 3.0, 1.2, 2.5))]
    out = saturated_worker_stats(samples, [2.0, 6.0])
    assert out["saturated_decode_tok_s"] == pytest.approx(20 / 0.2)  # batch 20, 200 ms
    assert out["saturated_executor_poll_cpu_share"] == pytest.approx((2.0 - 0.8) / 4)
    assert out["saturated_executor_nap_share"] == pytest.approx(2.0 / 4)
    # without an executor there is no polling to report
    plain = saturated_worker_stats([(t, ms[:2]) for t, ms in samples], [2.0, 6.0])
    assert "saturated_executor_poll_cpu_share" not in plain
