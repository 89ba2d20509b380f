"""Over-time samples of a server's Prometheus ``/metrics`` while a benchmark runs.

One sample per ``interval_s`` (a failed or unparsable scrape is skipped; a 404 stops sampling,
the server has no metrics route):

- ``t``: seconds since sampling started (the benchmark's start, within a scrape);
- ``offload_ratio``: ``adrenaline_offload_ratio`` (running decode requests whose attention is
  offloaded), None where the server does not export it (vLLM);
- ``kv_use``: {instance: KV blocks used / (used + free)} from adrenaline's per-worker gauges,
  instances named ``f"{role}{index}"`` (``decode0``, ``prefill0``, ``executor0``); vLLM's
  ``vllm:kv_cache_usage_perc`` appears as ``vllm0``;
- ``attn_kv_bytes``: {instance: cumulative KV bytes attention read}, executors only;
- ``prefix_hit_tokens`` / ``prefix_prefill_tokens``: cumulative prompt tokens taken from the
  prefix cache / prefilled, summed over the prefill instances (0 where not exported).

``add_bandwidth`` turns the cumulative bytes into ``attn_gbs`` {instance: GB/s over the interval
before each sample}; the first sample has none.
"""

from __future__ import annotations

import asyncio
import math
import time

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict:
    """One sample (without ``t``) from a Prometheus text exposition."""
    used: dict[str, float] = {}
    free: dict[str, float] = {}
    out: dict = {"offload_ratio": None, "kv_use": {}, "attn_kv_bytes": {},
                 "prefix_hit_tokens": 0.0, "prefix_prefill_tokens": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            inst = f"{s.labels.get('role', '')}{s.labels.get('index', '')}"
            if s.name == "adrenaline_offload_ratio" and not math.isnan(s.value):
                out["offload_ratio"] = s.value
            elif s.name == "adrenaline_worker_kv_blocks_used":
                used[inst] = s.value
            elif s.name == "adrenaline_worker_kv_blocks_free":
                free[inst] = s.value
            elif s.name == "adrenaline_worker_attention_kv_bytes_read" and inst.startswith("executor"):
                out["attn_kv_bytes"][inst] = s.value
            elif s.name == "adrenaline_worker_prefix_cache_hit_tokens":
                out["prefix_hit_tokens"] += s.value
            elif s.name == "adrenaline_worker_prefix_cache_prefill_tokens":
                out["prefix_prefill_tokens"] += s.value
            elif s.name == "vllm:kv_cache_usage_perc":
                out["kv_use"][f"vllm{s.labels.get('engine', '0')}"] = s.value
    for inst, u in used.items():
        total = u + free.get(inst, 0.0)
        out["kv_use"][inst] = u / total if total > 0 else 0.0
    return out


async def sample_metrics(client, base_url: str, stop: asyncio.Event,
                         interval_s: float = 1.0) -> list[dict]:
    """Scrape ``base_url/metrics`` every ``interval_s`` until ``stop`` is set."""
    url = base_url.rstrip("/") + "/metrics"
    t0 = time.perf_counter()
    samples: list[dict] = []
    while not stop.is_set():
        t = time.perf_counter() - t0
        try:
            resp = await client.get(url, timeout=10)
            if resp.status_code == 404:
                break
            if resp.status_code == 200:
                samples.append({"t": t, **parse_metrics(resp.text)})
        except Exception:  # noqa: BLE001 - a missed scrape only leaves a gap
            pass
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + t + interval_s - time.perf_counter()))
        except asyncio.TimeoutError:
            pass
    return samples


def add_bandwidth(samples: list[dict]) -> list[dict]:
    """Each sample with ``attn_gbs``: bytes read since the previous sample / time between."""
    prev = None
    for s in samples:
        s["attn_gbs"] = {}
        if prev is not None and s["t"] > prev["t"]:
            dt = s["t"] - prev["t"]
            for inst, b in s["attn_kv_bytes"].items():
                if inst in prev["attn_kv_bytes"]:
                    s["attn_gbs"][inst] = max(0.0, b - prev["attn_kv_bytes"][inst]) / dt / 1e9
        prev = s
    return samples


def scrape(base_url: str) -> dict | None:
    """One synchronous sample (without ``t``); None when the server has no /metrics."""
    import httpx

    try:
        resp = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return parse_metrics(resp.text) if resp.status_code == 200 else None


def prefix_hit_rate(before: dict | None, after: dict | None) -> float | None:
    """Prefix cache hit rate in tokens between two samples (None: unknown or nothing prefilled)."""
    if before is None or after is None:
        return None
    total = after["prefix_prefill_tokens"] - before["prefix_prefill_tokens"]
    return (after["prefix_hit_tokens"] - before["prefix_hit_tokens"]) / total if total > 0 else None
