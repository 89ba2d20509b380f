"""Latency bookkeeping shared by the benchmarks (vLLM's definitions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTiming:
    """Wall-clock marks of one request: start, each token's arrival."""

    start: float
    token_times: list[float] = field(default_factory=list)
    # Exact count when one mark may stand for several tokens (an SSE chunk); else len(marks).
    num_tokens: int | None = None

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than 2 tokens)."""
        n = self.num_output_tokens
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def summarize(timings: list[RequestTiming], elapsed: float) -> dict:
    ttft = np.array([t.ttft for t in timings]) * 1e3
    tpot = np.array([t.tpot for t in timings if t.tpot is not None]) * 1e3
    n_out = sum(t.num_output_tokens for t in timings)
    out = {"num_requests": len(timings), "num_output_tokens": n_out, "elapsed_s": elapsed,
           "output_tok_s": n_out / elapsed}
    for name, arr in (("ttft", ttft), ("tpot", tpot)):
        if arr.size:
            out[f"{name}_mean_ms"] = float(arr.mean())
            out[f"{name}_p50_ms"] = float(np.percentile(arr, 50))
            out[f"{name}_p99_ms"] = float(np.percentile(arr, 99))
    return out
