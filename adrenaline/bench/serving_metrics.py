"""Serving metrics from per-request timelines, as vLLM's ``benchmark_serving`` defines them.

Definitions (all latencies reported in milliseconds, rates per second):

- TTFT  = first token chunk's arrival - request start.
- E2E   = request end - request start; the end is the stream's end when recorded, else the
  last token chunk's arrival.
- TPOT  = (E2E - TTFT) / (n_out - 1), only for requests with n_out > 1 (n_out is the exact
  output token count, e.g. from the usage chunk, which may exceed the number of chunks).
- ITL   = every gap between consecutive token chunks, pooled over all requests.
- request throughput       = completed / duration
- output token throughput  = sum(n_out of successful requests) / duration
- total token throughput   = (sum(prompt tokens) + sum(n_out)), successful requests, / duration
- goodput (DistServe)      = successful requests meeting *every* given SLO / duration; for the
  TPOT SLO a request with n_out <= 1 counts as TPOT 0 (vLLM's ``all_tpots``).

``summarize`` gives the same numbers under the field names the engine, serve and offload
benchmarks' JSON uses (``output_tok_s``, ``ttft_p50_ms``, ``tpot_p99_ms``, ...).

Invariants: a request that failed or never received a token chunk (vLLM: "never received a
valid chunk") is failed; failed requests count in ``num_failed`` only and never enter a latency statistic
or a token count; statistics of an empty sample are 0 (vLLM's ``np.mean(x or 0)``);
percentiles use numpy's default linear interpolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 99)


@dataclass
class RequestTimeline:
    """What the client saw of one request; times are seconds on one monotonic clock."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token chunk
    num_output_tokens: int | None = None  # exact count; None -> len(token_times)
    prompt_tokens: int = 0
    success: bool = True
    end: float | None = None  # end of the stream; None -> last token's arrival
    error: str = ""

    @property
    def n_out(self) -> int:
        return self.num_output_tokens if self.num_output_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        end = self.end if self.end is not None else self.token_times[-1]
        return end - self.start

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (n_out - 1); None when n_out <= 1."""
        n = self.n_out
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives in ms; None means "no objective"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def met_by(self, t: RequestTimeline) -> bool:
        """True when a successful request meets every objective (limits inclusive)."""
        if not t.success or not t.token_times:
            return False
        if self.ttft_ms is not None and t.ttft * 1e3 > self.ttft_ms:
            return False
        if self.tpot_ms is not None and (t.tpot or 0.0) * 1e3 > self.tpot_ms:
            return False
        return self.e2e_ms is None or t.e2e * 1e3 <= self.e2e_ms


@dataclass
class LatencyStats:
    """mean, std, median and the requested percentiles of one latency sample, in ms."""

    mean: float
    std: float
    median: float
    percentiles: dict[str, float]  # "p90" -> ms

    @classmethod
    def of(cls, seconds: list[float], percentiles: tuple[float, ...]) -> LatencyStats:
        ms = np.asarray(seconds if seconds else [0.0], dtype=np.float64) * 1e3
        return cls(mean=float(ms.mean()), std=float(ms.std()), median=float(np.median(ms)),
                   percentiles={_pname(p): float(np.percentile(ms, p)) for p in percentiles})


def _pname(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


@dataclass
class ServingMetrics:
    """Aggregate result of one benchmark run (see the module docstring for definitions)."""

    duration_s: float
    completed: int
    num_failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None  # None when no SLO was given
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict[str, float | int | None]:
        """One level: ``ttft_mean_ms``, ``tpot_p99_ms``, ... next to the scalar fields."""
        out: dict[str, float | int | None] = {}
        for k, v in asdict(self).items():
            if isinstance(v, dict):
                name = k[:-3]
                out[f"{name}_mean_ms"] = v["mean"]
                out[f"{name}_std_ms"] = v["std"]
                out[f"{name}_median_ms"] = v["median"]
                for p, x in v["percentiles"].items():
                    out[f"{name}_{p}_ms"] = x
            else:
                out[k] = v
        return out


def compute_metrics(timelines: list[RequestTimeline], duration_s: float, slo: Slo | None = None,
                    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> ServingMetrics:
    """Aggregate timelines over a run that lasted ``duration_s`` seconds (> 0)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [t for t in timelines if t.success and t.token_times]
    ttfts = [t.ttft for t in ok]
    tpots = [t.tpot for t in ok if t.tpot is not None]
    itls = [g for t in ok for g in t.itls]
    e2es = [t.e2e for t in ok]
    n_in = sum(t.prompt_tokens for t in ok)
    n_out = sum(t.n_out for t in ok)
    goodput = None
    if slo is not None and not slo.empty:
        goodput = sum(slo.met_by(t) for t in ok) / duration_s
    return ServingMetrics(
        duration_s=duration_s, completed=len(ok), num_failed=len(timelines) - len(ok),
        total_input_tokens=n_in, total_output_tokens=n_out,
        request_throughput=len(ok) / duration_s, output_throughput=n_out / duration_s,
        total_token_throughput=(n_in + n_out) / duration_s, request_goodput=goodput,
        ttft_ms=LatencyStats.of(ttfts, percentiles), tpot_ms=LatencyStats.of(tpots, percentiles),
        itl_ms=LatencyStats.of(itls, percentiles), e2e_ms=LatencyStats.of(e2es, percentiles))


def summarize(timelines: list[RequestTimeline], elapsed_s: float) -> dict:
    """num_requests, num_output_tokens, elapsed_s, output_tok_s and TTFT/TPOT mean, p50, p99 (ms)
    of successful requests, from ``compute_metrics``: the offline/offload benchmarks' fields."""
    m = compute_metrics(timelines, elapsed_s)
    f = m.flat()
    out = {"num_requests": len(timelines), "num_output_tokens": m.total_output_tokens,
           "elapsed_s": elapsed_s, "output_tok_s": m.output_throughput}
    for name in ("ttft", "tpot"):
        for stat in ("mean", "p50", "p90", "p99"):
            out[f"{name}_{stat}_ms"] = f.get(f"{name}_{stat}_ms")
    return out


def saturated_throughput(timelines: list[RequestTimeline]) -> dict:
    """Output tok/s while the system was saturated: from the last request's arrival to the
    last first token. Throughout that window every request has arrived and at least one
    (the last to get its first token) waits, so the system serves at its bound; the ramp
    before it and the drain after it are left out. A window as short as one prefill means
    the system was not saturated when the last request came (the row keeps the window).
    Empty when the last first token came before the last arrival."""
    ok = [t for t in timelines if t.success and t.token_times]
    if not ok:
        return {}
    t0, t1 = max(t.start for t in ok), max(t.token_times[0] for t in ok)
    origin = min(t.start for t in ok)
    if t1 <= t0:
        return {}
    times = np.concatenate([np.asarray(t.token_times) for t in ok])
    n = int(np.count_nonzero((times >= t0) & (times < t1)))
    return {"saturated_window_s": [t0 - origin, t1 - origin], "saturated_output_tok_s": n / (t1 - t0)}


def tokens_by_interval(timelines: list[RequestTimeline], width_s: float = 10.0) -> list[int]:
    """Output tokens arriving in each ``width_s`` interval from the first request's start."""
    ok = [t for t in timelines if t.success and t.token_times]
    if not ok:
        return []
    origin = min(t.start for t in ok)
    times = np.concatenate([np.asarray(t.token_times) for t in ok]) - origin
    counts = np.bincount((times // width_s).astype(np.int64))
    return [int(c) for c in counts]
