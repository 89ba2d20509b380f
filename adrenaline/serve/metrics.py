"""Prometheus metrics of the ingress replica (``GET /metrics``).

Everything lives in the replica's own ``CollectorRegistry`` (never the global
one), so several Ingress instances in one process (tests) do not collide.

* Per request (recorded by the ingress as the router's deltas arrive):
  TTFT, TPOT = (e2e - ttft) / (n_out - 1) (only when n_out > 1), e2e latency,
  requests by finish reason, prompt and generation token counters.
* Per worker (refreshed from ``router.metrics()`` on each scrape, labels
  ``role`` and ``index``, roles prefill, decode and executor): running and waiting
  requests, KV blocks used and free, offloaded requests, and the workers' cumulative
  steps, busy seconds (compute use), executor KV bytes read (bandwidth use) and
  decode time waiting on executors.
  Workers absent from the latest poll are dropped, so no stale series remain.
* Cluster-wide, from the same poll: ``adrenaline_offload_ratio``, the share of the requests
  running on decode instances whose attention is offloaded onto an executor (sum of decode
  ``num_offloaded`` / sum of decode ``num_running``; 0 while none runs, NaN after a failed
  poll), and per worker ``adrenaline_worker_kv_usage_ratio`` (KV blocks used / total).
* Prefix cache, per prefill instance (role ``prefill``): ``adrenaline_worker_prefix_cache_hit_ratio``
  (prompt tokens whose KV came from the cache / prompt tokens prefilled, since the worker
  started; 0 before any), the two cumulative token counts behind it
  (``..._prefix_cache_hit_tokens``, ``..._prefix_cache_prefill_tokens``: rate() them for a
  windowed ratio) and ``adrenaline_worker_kv_blocks_cached`` (pages holding a cached prefix
  block, in use or free).
* The placement policy (serve/policy_metrics.py): its choices, its bounds, the start-up profile.
* Router-wide, from ``router.stats()`` on each scrape (cumulative since the router
  started; rate() them): ``adrenaline_router_reruns`` (attempts rerun after an actor
  was lost) and ``adrenaline_router_refused_requests`` (requests the router refused
  with 429). A failed poll sets them to NaN.

deploy/grafana/adrenaline.json is a dashboard over these series
(tests/integration/test_grafana_dashboard.py checks that it names only exported ones).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from adrenaline.protocol import WorkerMetrics
from adrenaline.serve.policy_metrics import PolicyMetrics

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                600.0)
_WORKER_LABELS = ("role", "index")


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("adrenaline_time_to_first_token_seconds",
                              "Arrival at the ingress to the first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("adrenaline_time_per_output_token_seconds",
                              "Per request: (e2e - ttft) / (output tokens - 1)",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("adrenaline_e2e_request_latency_seconds",
                             "Arrival at the ingress to the last generated token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.requests = Counter("adrenaline_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("adrenaline_prompt_tokens",
                                     "Prompt tokens of requests sent to the router", registry=r)
        self.generation_tokens = Counter("adrenaline_generation_tokens",
                                         "Tokens generated", registry=r)
        self.running = Gauge("adrenaline_worker_running_requests",
                             "Requests running on a worker", _WORKER_LABELS, registry=r)
        self.waiting = Gauge("adrenaline_worker_waiting_requests",
                             "Requests waiting on a worker", _WORKER_LABELS, registry=r)
        self.kv_used = Gauge("adrenaline_worker_kv_blocks_used",
                             "KV cache blocks in use on a worker", _WORKER_LABELS, registry=r)
        self.kv_free = Gauge("adrenaline_worker_kv_blocks_free",
                             "KV cache blocks free on a worker", _WORKER_LABELS, registry=r)
        # Offloading and compute use; cumulative values are gauges set from the workers'
        # own totals (use rate() on them), since a restarted worker restarts its totals.
        self.offloaded = Gauge("adrenaline_worker_offloaded_requests",
                               "Decode: running requests whose attention is on an executor",
                               _WORKER_LABELS, registry=r)
        self.steps = Gauge("adrenaline_worker_steps", "Engine steps run (cumulative)",
                           _WORKER_LABELS, registry=r)
        self.busy = Gauge("adrenaline_worker_busy_seconds",
                          "Time in decode steps or executor attention (cumulative; compute use)",
                          _WORKER_LABELS, registry=r)
        self.attn_bytes = Gauge("adrenaline_worker_attention_kv_bytes_read",
                                "Executor: KV bytes attention read (cumulative; bandwidth use)",
                                _WORKER_LABELS, registry=r)
        self.remote_wait = Gauge("adrenaline_worker_remote_attention_wait_seconds",
                                 "Decode: time waiting on executors' outputs (cumulative)",
                                 _WORKER_LABELS, registry=r)
        self.kv_usage = Gauge("adrenaline_worker_kv_usage_ratio",
                              "KV cache blocks in use / blocks in the pool", _WORKER_LABELS,
                              registry=r)
        self.offload_ratio = Gauge("adrenaline_offload_ratio",
                                   "Share of running decode requests whose attention is "
                                   "offloaded onto an executor", registry=r)
        self.prefix_hit_tokens = Gauge(
            "adrenaline_worker_prefix_cache_hit_tokens",
            "Prefill: prompt tokens whose KV came from the prefix cache (cumulative)",
            _WORKER_LABELS, registry=r)
        self.prefix_prefill_tokens = Gauge(
            "adrenaline_worker_prefix_cache_prefill_tokens",
            "Prefill: prompt tokens prefilled, cached or computed (cumulative)",
            _WORKER_LABELS, registry=r)
        self.prefix_hit_ratio = Gauge(
            "adrenaline_worker_prefix_cache_hit_ratio",
            "Prefill: prefix cache hit rate in tokens since the worker started",
            _WORKER_LABELS, registry=r)
        self.kv_cached = Gauge("adrenaline_worker_kv_blocks_cached",
                               "Prefill: KV blocks holding a cached prefix block (used or free)",
                               _WORKER_LABELS, registry=r)
        self.policy = PolicyMetrics(r)  # the policy's choices, bounds and start-up profile
        self.reruns = Gauge("adrenaline_router_reruns",
                            "Request attempts rerun after an actor was lost (cumulative)",
                            registry=r)
        self.refused = Gauge("adrenaline_router_refused_requests",
                             "Requests the router refused with 429 (cumulative)", registry=r)
        self._worker_gauges = (self.running, self.waiting, self.kv_used, self.kv_free,
                               self.offloaded, self.steps, self.busy, self.attn_bytes,
                               self.remote_wait, self.kv_usage, self.prefix_hit_tokens,
                               self.prefix_prefill_tokens, self.prefix_hit_ratio, self.kv_cached)

    def track(self, num_prompt_tokens: int, start: float | None = None) -> RequestTracker:
        """A tracker for one request that arrived at ``start`` (time.perf_counter())."""
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self, start if start is not None else time.perf_counter())

    def set_workers(self, workers: list[WorkerMetrics] | None) -> None:
        """Replace the per-worker gauges with one poll (None: the poll failed, drop them)."""
        for g in self._worker_gauges:
            g.clear()
        for w in workers or ():
            labels = (w.role, str(w.index))
            self.running.labels(*labels).set(w.num_running)
            self.waiting.labels(*labels).set(w.num_waiting)
            self.kv_used.labels(*labels).set(w.kv_blocks_used)
            self.kv_free.labels(*labels).set(w.kv_blocks_total - w.kv_blocks_used)
            self.offloaded.labels(*labels).set(w.num_offloaded)
            self.steps.labels(*labels).set(w.num_steps)
            self.busy.labels(*labels).set(w.step_time_s + w.busy_s)
            self.attn_bytes.labels(*labels).set(w.kv_bytes_read)
            self.remote_wait.labels(*labels).set(w.remote_wait_s)
            self.kv_usage.labels(*labels).set(w.kv_blocks_used / max(w.kv_blocks_total, 1))
            if w.role == "prefill":
                self.prefix_hit_tokens.labels(*labels).set(w.prefix_cached_tokens)
                self.prefix_prefill_tokens.labels(*labels).set(w.prefill_tokens)
                self.prefix_hit_ratio.labels(*labels).set(
                    w.prefix_cached_tokens / w.prefill_tokens if w.prefill_tokens else 0.0)
                self.kv_cached.labels(*labels).set(w.kv_blocks_cached)
        self.offload_ratio.set(float("nan") if workers is None else offload_ratio(workers))

    def set_router(self, stats: dict | None) -> None:
        """Router-wide counters from one ``router.stats()`` poll (None: it failed)."""
        stats = stats or {}
        self.reruns.set(stats.get("num_reruns", float("nan")))
        self.refused.set(stats.get("num_refused", float("nan")))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def offload_ratio(workers: list[WorkerMetrics]) -> float:
    """Offloaded / running requests over the decode workers (0 when none runs)."""
    decode = [w for w in workers if w.role == "decode"]
    running = sum(w.num_running for w in decode)
    return sum(w.num_offloaded for w in decode) / running if running else 0.0


class RequestTracker:
    """Timings of one request. ``tokens`` per delta; ``finish`` once (later calls are no-ops)."""

    def __init__(self, metrics: IngressMetrics, start: float):
        self._m = metrics
        self.start = start
        self.first_token_at: float | None = None
        self.num_output_tokens = 0
        self.finished = False

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.num_output_tokens += n
        self._m.generation_tokens.inc(n)

    def finish(self, reason: str) -> None:
        """Count the request under ``reason``; latencies only for requests that completed."""
        if self.finished:
            return
        self.finished = True
        self._m.requests.labels(reason).inc()
        if reason not in ("stop", "length") or self.first_token_at is None:
            return
        e2e = time.perf_counter() - self.start
        ttft = self.first_token_at - self.start
        self._m.e2e.observe(e2e)
        self._m.ttft.observe(ttft)
        if self.num_output_tokens > 1:
            self._m.tpot.observe((e2e - ttft) / (self.num_output_tokens - 1))
