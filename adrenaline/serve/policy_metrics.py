"""Prometheus gauges of the placement policy: its choices, its bounds and the start-up profile.

Refreshed on each /metrics scrape from ``Router.stats()``:

* ``adrenaline_policy_placed_requests`` / ``adrenaline_policy_offloaded_requests``: attempts
  placed and admitted onto an executor since the router started (rate() them for the
  policy's offload ratio over a window);
* ``adrenaline_policy_b_max``, ``adrenaline_policy_ob_mem``: load_aware's bounds (absent for
  policies without them), and ``adrenaline_policy_step_scale{decode}``: its served over
  modeled decode step (policy/step_feedback.py);
* from the start-up profile (absent when the policy did not ask for one):
  ``adrenaline_profile_base_step_seconds{batch}`` (a decode step without attention),
  ``adrenaline_profile_attention_seconds_per_token{role,index}`` (decode and executors),
  ``adrenaline_profile_attention_bandwidth_gbs{role,index}``, ``adrenaline_profile_exchange_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily


class OptionalGauge:
    """An unlabelled gauge that is absent from a scrape while it holds no value (a
    prometheus_client Gauge without labels always exports one sample)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def clear(self) -> None:
        self.value = None

    def describe(self):
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self):
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.placed = Gauge("adrenaline_policy_placed_requests",
                            "Attempts placed by the policy (cumulative)", registry=r)
        self.offloaded = Gauge("adrenaline_policy_offloaded_requests",
                               "Attempts admitted onto an attention executor (cumulative)",
                               registry=r)
        self.b_max = OptionalGauge("adrenaline_policy_b_max",
                                   "load_aware: largest decode batch within the TPOT SLO", r)
        self.ob_mem = OptionalGauge("adrenaline_policy_ob_mem",
                                    "load_aware: the memory offload bound", r)
        self.step_scale = Gauge("adrenaline_policy_step_scale",
                                "load_aware: a served decode step over the profile's model",
                                ["decode"], registry=r)
        self.base_step = Gauge("adrenaline_profile_base_step_seconds",
                               "Start-up profile: decode step without attention, by batch",
                               ["batch"], registry=r)
        self.attn = Gauge("adrenaline_profile_attention_seconds_per_token",
                          "Start-up profile: a decode step's attention per KV token",
                          ["role", "index"], registry=r)
        self.attn_bw = Gauge("adrenaline_profile_attention_bandwidth_gbs",
                             "Start-up profile: KV bytes per second attention reads",
                             ["role", "index"], registry=r)
        self.exchange = OptionalGauge("adrenaline_profile_exchange_seconds",
                                      "Start-up profile: a decode step's exchange with one "
                                      "executor", r)
        self._optional = (self.b_max, self.ob_mem, self.step_scale, self.base_step, self.attn,
                          self.attn_bw, self.exchange)

    def set_stats(self, stats: dict | None) -> None:
        """One ``Router.stats()`` answer (None: the call failed; the policy series go)."""
        for g in self._optional:
            g.clear()
        if stats is None:
            return
        self.placed.set(stats["num_placed"])
        self.offloaded.set(stats["num_offloaded"])
        if stats.get("b_max") is not None:
            self.b_max.set(stats["b_max"])
        if stats.get("ob_mem") is not None:
            self.ob_mem.set(stats["ob_mem"])
        for d, scale in enumerate(stats.get("step_scale") or []):
            self.step_scale.labels(str(d)).set(scale)
        profile = stats.get("profile")
        if not profile:
            return
        for batch, ms in profile["base_step_ms"].items():
            self.base_step.labels(str(batch)).set(ms / 1e3)
        for role in ("decode", "executor"):
            for i, us in enumerate(profile[f"{role}_attn_us_per_token"]):
                self.attn.labels(role, str(i)).set(us / 1e6)
            for i, gbs in enumerate(profile[f"{role}_bandwidth_gbs"]):
                self.attn_bw.labels(role, str(i)).set(gbs)
        self.exchange.set(profile["exchange_ms"] / 1e3)
