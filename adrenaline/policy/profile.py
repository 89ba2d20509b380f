"""What a cluster measured at start-up, and the bounds load-aware offloading derives from it.

A decode step's time is split the way the paper's premise needs it:

    step(batch, kv_tokens) = base(batch) + kv_tokens x attention seconds per KV token

``base`` (weights, linear layers, sampling, overheads: everything but attention)
is measured at batch sizes up to the decode engine's ``max_num_seqs`` and
interpolated between them; the attention term is measured by running attention
over long contexts, so a bound derived from it holds at any context length.
Each executor's attention speed is measured the same way (by running attention,
not by a tensor copy), and so is the exchange a decode step pays per executor.
This module holds the numbers and the arithmetic only; the actors measure them
(actors/cluster_profile.py) and the simulator computes them from its cost model.
"""

from __future__ import annotations

from dataclasses import dataclass


def profile_batches(max_num_seqs: int) -> list[int]:
    """Batch sizes a start-up profile times: powers of two up to ``max_num_seqs``, and it."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


@dataclass(frozen=True)
class ClusterProfile:
    base_step_s: dict[int, float]  # decode batch -> step seconds without attention (decode 0)
    decode_attn_s_per_token: list[float]  # per decode instance: a step's attention, per KV token
    executor_attn_s_per_token: list[float]  # per executor, the same
    exchange_s: float  # a decode step's exchange with one executor (all layers), beyond compute
    decode_capacity_tokens: list[int]
    executor_capacity_tokens: list[int]
    kv_bytes_per_token: int = 0  # all layers' K and V: turns attention speed into bandwidth

    def base_s(self, batch: int) -> float:
        """Non-attention step seconds at ``batch``: linear between profiled sizes (and beyond
        the largest, along the last segment)."""
        pts = sorted(self.base_step_s.items())
        if batch <= pts[0][0]:
            return pts[0][1]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        if len(pts) == 1:
            return pts[0][1]
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (batch - b1) / (b1 - b0)

    def step_s(self, batch: int, local_kv_tokens: int, decode: int = 0) -> float:
        """A decode step of ``batch`` requests whose local attention reads ``local_kv_tokens``."""
        return self.base_s(batch) + local_kv_tokens * self.decode_attn_s_per_token[decode]

    def b_max(self, tpot_slo_s: float, local_kv_tokens: int, decode: int = 0) -> int:
        """The largest batch whose step fits the SLO while the local attention reads
        ``local_kv_tokens`` (offloaded requests add only their non-attention share);
        at least 1, at most the largest profiled batch."""
        top = max(self.base_step_s)
        best = 1
        for b in range(1, top + 1):
            if self.step_s(b, local_kv_tokens, decode) > tpot_slo_s:
                break
            best = b
        return best

    def remote_s(self, executor: int, kv_tokens: int) -> float:
        """The time an executor needs for a step over ``kv_tokens`` of offloaded KV."""
        return self.exchange_s + kv_tokens * self.executor_attn_s_per_token[executor]

    def local_attention_s(self, kv_tokens: int, decode: int = 0) -> float:
        return kv_tokens * self.decode_attn_s_per_token[decode]

    @property
    def decode_bandwidth_gbs(self) -> list[float]:
        """KV bytes per second each decode instance's attention reads."""
        return [self.kv_bytes_per_token / s / 1e9 if s > 0 else 0.0
                for s in self.decode_attn_s_per_token]

    @property
    def executor_bandwidth_gbs(self) -> list[float]:
        return [self.kv_bytes_per_token / s / 1e9 if s > 0 else 0.0
                for s in self.executor_attn_s_per_token]

    def summary(self) -> dict:
        """The figures a log line and /metrics show."""
        return {"base_step_ms": {b: round(1e3 * t, 3) for b, t in sorted(self.base_step_s.items())},
                "decode_attn_us_per_token": [1e6 * s for s in self.decode_attn_s_per_token],
                "executor_attn_us_per_token": [1e6 * s for s in self.executor_attn_s_per_token],
                "exchange_ms": 1e3 * self.exchange_s,
                "decode_bandwidth_gbs": self.decode_bandwidth_gbs,
                "executor_bandwidth_gbs": self.executor_bandwidth_gbs,
                "decode_capacity_tokens": list(self.decode_capacity_tokens),
                "executor_capacity_tokens": list(self.executor_capacity_tokens)}
