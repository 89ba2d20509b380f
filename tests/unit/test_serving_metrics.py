"""serving_metrics on hand-made timelines whose answers are worked out by hand.

Timelines (seconds), benchmark duration 2 s:
  A: start 0.0, chunks 0.10 0.20 0.40, 3 tokens, 10 prompt  -> TTFT 100, E2E 400, TPOT 150, ITL 100 200
  B: start 1.0, chunks 1.30 1.35, 5 tokens (merged chunks), 20 prompt, stream end 1.50
                                                          -> TTFT 300, E2E 500, TPOT 50,  ITL 50
  C: start 2.0, chunk 2.05, 1 token, 7 prompt             -> TTFT 50,  E2E 50,  no TPOT, no ITL
  D: failed (100 prompt tokens)                           -> counted in num_failed only
"""

from __future__ import annotations

import math

import pytest

from adrenaline.bench.serving_metrics import (RequestTimeline, Slo, compute_metrics,
                                             saturated_throughput, summarize, tokens_by_interval)

EXACT = dict(rel=1e-9, abs=1e-9)


def _timelines() -> list[RequestTimeline]:
    return [
        RequestTimeline(start=0.0, token_times=[0.1, 0.2, 0.4], num_output_tokens=3, prompt_tokens=10),
        RequestTimeline(start=1.0, token_times=[1.3, 1.35], num_output_tokens=5, prompt_tokens=20,
                        end=1.5),
        RequestTimeline(start=2.0, token_times=[2.05], prompt_tokens=7),
        RequestTimeline(start=0.0, prompt_tokens=100, success=False, error="boom"),
    ]


def test_per_request_definitions():
    a, b, c, _ = _timelines()
    assert a.ttft == pytest.approx(0.1, **EXACT) and a.e2e == pytest.approx(0.4, **EXACT)
    assert a.tpot == pytest.approx(0.15, **EXACT)
    assert b.e2e == pytest.approx(0.5, **EXACT)  # the stream's end, not the last chunk
    assert b.tpot == pytest.approx(0.05, **EXACT)  # (0.5 - 0.3) / (5 - 1): usage count, not chunks
    assert c.tpot is None and c.itls == []
    assert a.itls == pytest.approx([0.1, 0.2], **EXACT)


def test_counts_and_throughputs():
    m = compute_metrics(_timelines(), duration_s=2.0)
    assert (m.completed, m.num_failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (37, 9)
    assert m.request_throughput == pytest.approx(1.5, **EXACT)
    assert m.output_throughput == pytest.approx(4.5, **EXACT)
    assert m.total_token_throughput == pytest.approx(23.0, **EXACT)
    assert m.request_goodput is None


def test_latency_statistics():
    m = compute_metrics(_timelines(), duration_s=2.0, percentiles=(50, 90, 99))
    # TTFT [100, 300, 50]
    assert m.ttft_ms.mean == pytest.approx(150, **EXACT)
    assert m.ttft_ms.median == pytest.approx(100, **EXACT)
    assert m.ttft_ms.std == pytest.approx(math.sqrt(35000 / 3), **EXACT)
    assert m.ttft_ms.percentiles == pytest.approx({"p50": 100, "p90": 260, "p99": 296}, **EXACT)
    # TPOT [150, 50] (C has one token: no TPOT)
    assert m.tpot_ms.mean == pytest.approx(100, **EXACT)
    assert m.tpot_ms.percentiles == pytest.approx({"p50": 100, "p90": 140, "p99": 149}, **EXACT)
    # ITL pooled [100, 200, 50]
    assert m.itl_ms.mean == pytest.approx(350 / 3, **EXACT)
    assert m.itl_ms.percentiles == pytest.approx({"p50": 100, "p90": 180, "p99": 198}, **EXACT)
    # E2E [400, 500, 50]
    assert m.e2e_ms.mean == pytest.approx(950 / 3, **EXACT)
    assert m.e2e_ms.percentiles == pytest.approx({"p50": 400, "p90": 480, "p99": 498}, **EXACT)
    flat = m.flat()
    assert flat["ttft_p90_ms"] == pytest.approx(260, **EXACT)
    assert flat["e2e_median_ms"] == pytest.approx(400, **EXACT)


@pytest.mark.parametrize("slo, goodput", [
    (Slo(ttft_ms=200), 1.0),               # A, C
    (Slo(tpot_ms=100), 1.0),               # B, C (C's TPOT counts as 0)
    (Slo(ttft_ms=200, tpot_ms=100), 0.5),  # C only: every SLO must hold
    (Slo(e2e_ms=400), 1.0),                # A (limit inclusive), C
    (Slo(ttft_ms=10), 0.0),
])
def test_goodput(slo, goodput):
    assert compute_metrics(_timelines(), 2.0, slo=slo).request_goodput == pytest.approx(goodput, **EXACT)


def test_empty_and_all_failed():
    m = compute_metrics([RequestTimeline(start=0.0, success=False)], 1.0, slo=Slo(ttft_ms=1))
    assert (m.completed, m.num_failed, m.total_output_tokens) == (0, 1, 0)
    assert m.ttft_ms.mean == 0 and m.tpot_ms.percentiles["p99"] == 0
    assert m.request_goodput == 0
    # success=True but no chunk ever arrived: failed, like vLLM
    m = compute_metrics([RequestTimeline(start=0.0)], 1.0)
    assert (m.completed, m.num_failed) == (0, 1)
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_summarize_keeps_the_other_benchmarks_field_names():
    """The engine/serve/offload JSON fields, from the same definitions (successful requests)."""
    ok = _timelines()[:3]
    s = summarize(ok, elapsed_s=2.0)
    assert s["num_requests"] == 3 and s["num_output_tokens"] == 9
    assert s["elapsed_s"] == 2.0 and s["output_tok_s"] == pytest.approx(4.5, **EXACT)
    assert s["ttft_mean_ms"] == pytest.approx(150, **EXACT)
    assert s["ttft_p50_ms"] == pytest.approx(100, **EXACT)
    assert s["ttft_p99_ms"] == pytest.approx(296, **EXACT)
    assert (s["tpot_mean_ms"], s["tpot_p50_ms"]) == pytest.approx((100, 100), **EXACT)
    assert s["tpot_p99_ms"] == pytest.approx(149, **EXACT)
    # Token marks only (no stream end, no usage count): TPOT = (last - first) / (marks - 1).
    marks = RequestTimeline(start=0.0, token_times=[0.5, 0.6, 0.9])
    assert summarize([marks], 1.0)["tpot_mean_ms"] == pytest.approx(200, **EXACT)


def test_saturated_throughput_counts_the_window_from_last_arrival_to_last_first_token():
    # Two requests: one at t=0 streaming a token per second, one arriving at t=2 that waits
    # until t=6 for its first token. The window is [2, 6): tokens at 2, 3, 4, 5 of the first.
    a = RequestTimeline(start=0.0, token_times=[float(k) for k in range(1, 10)])
    b = RequestTimeline(start=2.0, token_times=[6.0, 7.0, 8.0])
    out = saturated_throughput([a, b])
    assert out["saturated_window_s"] == [2.0, 6.0]
    assert out["saturated_output_tok_s"] == pytest.approx(4 / 4.0)
    # Served on arrival: the window is only the last request's own TTFT (which the
    # report's window shows), and none when its first token is its arrival.
    short = saturated_throughput([RequestTimeline(start=0.0, token_times=[0.5, 1.0, 2.2]),
                                  RequestTimeline(start=2.0, token_times=[2.5])])
    assert short["saturated_window_s"] == [2.0, 2.5]
    assert short["saturated_output_tok_s"] == pytest.approx(1 / 0.5)
    assert saturated_throughput([RequestTimeline(start=0.0, token_times=[0.0])]) == {}
    assert saturated_throughput([]) == {}


def test_tokens_by_interval():
    a = RequestTimeline(start=1.0, token_times=[1.5, 2.0, 12.0])
    b = RequestTimeline(start=3.0, token_times=[25.0])
    assert tokens_by_interval([a, b], 10.0) == [2, 1, 1]
    assert tokens_by_interval([]) == []
