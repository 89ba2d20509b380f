"""The serving benchmark's sweep mode against fake endpoints (tests/unit/fake_openai.py).

Two systems, "fast" (ITL 5 ms) and "slow" (ITL 40 ms), and one whose launcher fails, swept
over two rates with the real client, metrics, sweep loop and plots; no model and no Ray.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest

from adrenaline.bench import serving
from adrenaline.bench.serving_metrics import Slo
from adrenaline.bench.serving_sweep import SystemUnavailable, offload_ratio, run_sweep
from adrenaline.bench.serving_workloads import random_requests
from tests.unit.fake_openai import FakeServer

RATES = [math.inf, 50.0]
NUM, OUT = 4, 6


@contextmanager
def _broken():
    raise SystemUnavailable("not installable here")
    yield  # pragma: no cover


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory):
    args = serving.parse_args(["--out", "unused.json", "--no-progress", "--sample-interval", "0.02"])
    reqs = random_requests(NUM, input_len=16, output_len=OUT, vocab_size=1000)
    slo = Slo(tpot_ms=20)
    fast, slow = FakeServer(ttft_s=0.01, itl_s=0.005), FakeServer(ttft_s=0.01, itl_s=0.04)
    launchers = {"fast": fast.running, "broken": _broken,
                 "slow": lambda: slow.running(with_stats=False)}
    warmed = []
    rows, skipped = run_sweep(
        launchers, RATES, lambda system, ep, rate: serving.bench_rate(args, reqs, slo, ep, rate),
        warmup=lambda ep: warmed.append(ep.base_url))
    return {"rows": rows, "skipped": skipped, "warmed": warmed, "reqs": reqs,
            "plot_dir": tmp_path_factory.mktemp("plots")}


def test_rows_cover_every_available_system_and_rate(sweep_result):
    rows = sweep_result["rows"]
    assert [(r["system"], r["request_rate"]) for r in rows] == [
        ("fast", math.inf), ("fast", 50.0), ("slow", math.inf), ("slow", 50.0)]
    assert list(sweep_result["skipped"]) == ["broken"]
    assert "not installable" in sweep_result["skipped"]["broken"]
    assert len(sweep_result["warmed"]) == 2  # once per system that started


def test_rows_hold_exact_counts_and_ordered_latencies(sweep_result):
    rows = sweep_result["rows"]
    want_in = sum(r.prompt_len for r in sweep_result["reqs"])
    for r in rows:
        m = r["metrics"]
        assert (m["completed"], m["num_failed"]) == (NUM, 0), r["errors"]
        assert (m["total_input_tokens"], m["total_output_tokens"]) == (want_in, NUM * OUT)
        assert len(r["ttfts_ms"]) == len(r["tpots_ms"]) == NUM
    fast = [r for r in rows if r["system"] == "fast"]
    slow = [r for r in rows if r["system"] == "slow"]
    for f, s in zip(fast, slow):
        assert f["metrics"]["tpot_median_ms"] < 20 < s["metrics"]["tpot_median_ms"]
        # Goodput under a 20 ms TPOT SLO: every fast request meets it, no slow one does.
        assert f["metrics"]["request_goodput"] == pytest.approx(f["metrics"]["request_throughput"])
        assert s["metrics"]["request_goodput"] == 0


def test_offload_ratio_only_where_the_endpoint_has_stats(sweep_result):
    fast, _, slow, _ = sweep_result["rows"]
    assert fast["offload_ratio"] == pytest.approx(0.5)  # 2 of the 4 placed in that run
    assert "offload_ratio" not in slow
    assert offload_ratio({"num_placed": 3, "num_offloaded": 1},
                         {"num_placed": 3, "num_offloaded": 1}) == 0.0


def test_metrics_sampled_over_time(sweep_result):
    """The slow runs last ~0.25 s: several scrapes of the fake /metrics land inside them."""
    for r in sweep_result["rows"]:
        samples = r["samples"]
        assert samples and samples[0]["t"] < 0.05
        assert all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
        assert all(s["offload_ratio"] == 0.5 for s in samples)
        assert all(0 <= s["kv_use"]["decode0"] <= 1 and s["kv_use"]["executor0"] == 0
                   for s in samples)
    slow = [r for r in sweep_result["rows"] if r["system"] == "slow"]
    for r in slow:
        samples = r["samples"]
        assert len(samples) >= 4
        # Streams in flight show as decode KV use (4 requests of 10 blocks at most).
        assert max(s["kv_use"]["decode0"] for s in samples) >= 0.1
        gbs = [s["attn_gbs"]["executor0"] for s in samples[1:]]
        assert not samples[0]["attn_gbs"] and len(gbs) == len(samples) - 1
        assert sorted(gbs)[len(gbs) // 2] == pytest.approx(1.0, rel=0.3)  # 1e9 B/s


def test_parse_metrics_reads_vllm_and_skips_nan():
    from adrenaline.bench.metrics_sampler import parse_metrics

    s = parse_metrics('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
                      "adrenaline_offload_ratio NaN\n")
    assert s == {"offload_ratio": None, "kv_use": {"vllm0": 0.25}, "attn_kv_bytes": {},
                 "prefix_hit_tokens": 0.0, "prefix_prefill_tokens": 0.0}


def test_prefix_hit_rate_between_two_scrapes():
    from adrenaline.bench.metrics_sampler import parse_metrics, prefix_hit_rate

    def text(hit0, total0, hit1, total1):
        return "".join(f'adrenaline_worker_prefix_cache_{k}_tokens{{index="{i}",role="prefill"}} {v}\n'
                       for i, k, v in [(0, "hit", hit0), (0, "prefill", total0),
                                       (1, "hit", hit1), (1, "prefill", total1)])

    before, after = parse_metrics(text(10, 100, 0, 50)), parse_metrics(text(310, 500, 90, 150))
    assert after["prefix_hit_tokens"] == 400 and after["prefix_prefill_tokens"] == 650
    assert prefix_hit_rate(before, after) == pytest.approx(390 / 500)
    assert prefix_hit_rate(None, after) is None and prefix_hit_rate(after, after) is None


def test_sweep_table(sweep_result):
    from adrenaline.bench.serving_sweep import sweep_table

    lines = sweep_table(sweep_result["rows"]).splitlines()
    assert len(lines) == 2 + len(sweep_result["rows"])
    fast = lines[2].split(" | ")
    assert fast[0] == "| fast" and fast[1] == "inf"
    assert fast[9] == "0.50"  # offload ratio from the fake router counters
    assert lines[4].split(" | ")[9] == "-"  # slow: no counters
    assert lines[4].rstrip(" |").split(" | ")[-1] != "-"  # executor GB/s sampled (slow run)


def test_plots_are_written(sweep_result):
    from adrenaline.bench.plots import plot_sweep

    paths = plot_sweep({"rows": sweep_result["rows"]}, sweep_result["plot_dir"])
    assert len(paths) == 4 and paths[-1].name == "serving_over_time.png"
    for p in paths:
        assert p.suffix == ".png" and p.stat().st_size > 5000


def test_sweep_launchers_and_layout():
    args = serving.parse_args(["--out", "x.json", "--sweep-rates", "1",
                               "--systems", "none,load_aware,vllm", "--decode-kv-tokens", "768"])
    assert args.model == "small"
    assert list(serving.sweep_launchers(args, port=1)) == ["none", "load_aware", "vllm"]
    none, la = serving.sweep_app_args(args, "none"), serving.sweep_app_args(args, "load_aware")
    assert not none["executor"]["enabled"] and la["executor"]["enabled"]
    assert la["policy"] == "load_aware" and la["decode"]["engine"]["kv_cache_tokens"] == 768
    args.systems = "none,bogus"
    with pytest.raises(SystemExit, match="unknown system 'bogus'"):
        serving.sweep_launchers(args, port=1)
