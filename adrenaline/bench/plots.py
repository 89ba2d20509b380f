"""Figures of a serving sweep (the JSON ``serving.py --sweep-rates`` writes), matplotlib Agg.

- ``serving_throughput.png``: request throughput and goodput vs request rate, one line per
  system (goodput only when the sweep had an SLO).
- ``serving_ttft_cdf.png`` / ``serving_tpot_cdf.png``: per-request latency CDFs, one line per
  (system, rate).
Invariant: drawing never needs a display (Agg backend) and only reads the result dict.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _systems(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in rows))


def plot_throughput(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in _systems(rows):
        rs = sorted((r for r in rows if r["system"] == s), key=lambda r: r["request_rate"])
        rates = [r["request_rate"] for r in rs]
        ax.plot(rates, [r["metrics"]["request_throughput"] for r in rs], "o-", label=f"{s} throughput")
        if all(r["metrics"].get("request_goodput") is not None for r in rs):
            ax.plot(rates, [r["metrics"]["request_goodput"] for r in rs], "s--", label=f"{s} goodput")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cdf(rows: list[dict], key: str, label: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        xs = np.sort(np.asarray(r.get(key, []), dtype=float))
        if xs.size:
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post",
                    label=f"{r['system']} @ {r['request_rate']:g} req/s")
    ax.set_xlabel(f"{label} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(result: dict, out_dir: str | Path = "docs") -> list[Path]:
    """Write the three figures into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    return [plot_throughput(rows, out / "serving_throughput.png"),
            plot_cdf(rows, "ttfts_ms", "TTFT", out / "serving_ttft_cdf.png"),
            plot_cdf(rows, "tpots_ms", "TPOT", out / "serving_tpot_cdf.png")]
