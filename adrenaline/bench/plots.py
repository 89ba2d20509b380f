"""Figures of a serving sweep (the JSON ``serving.py --sweep-rates`` writes), matplotlib Agg.

- ``serving_throughput.png``: request throughput and goodput (only when the sweep had an SLO)
  vs request rate, and output token throughput vs request rate; one color per system.
- ``serving_ttft_cdf.png`` / ``serving_tpot_cdf.png``: per-request latency CDFs, one panel per
  system, one line per rate.
- ``serving_over_time.png``: for each system's highest-rate run, the ``/metrics`` samples over
  time: offload ratio, KV use per instance, executor attention bandwidth (GB/s).
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
    """Left: request throughput (solid) and goodput (dashed) per system; right: output tok/s."""
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(_systems(rows)):
        rs = sorted((r for r in rows if r["system"] == s), key=lambda r: r["request_rate"])
        rates, color = [r["request_rate"] for r in rs], colors[i % len(colors)]
        ax_r.plot(rates, [r["metrics"]["request_throughput"] for r in rs], "o-", color=color,
                  label=f"{s} throughput")
        if all(r["metrics"].get("request_goodput") is not None for r in rs):
            ax_r.plot(rates, [r["metrics"]["request_goodput"] for r in rs], "s--", color=color,
                      mfc="none", label=f"{s} goodput")
        ax_t.plot(rates, [r["metrics"]["output_throughput"] for r in rs], "o-", color=color,
                  label=s)
    ax_r.set_ylabel("req/s")
    ax_t.set_ylabel("output tok/s")
    for ax in (ax_r, ax_t):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdf(rows: list[dict], key: str, label: str, path: Path) -> Path:
    """One panel per system (shared x axis), one line per request rate."""
    systems = _systems(rows)
    ncols = min(2, len(systems))
    nrows = -(-len(systems) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), sharex=True,
                             sharey=True, squeeze=False)
    for ax, s in zip(axes.flat, systems):
        for r in sorted((r for r in rows if r["system"] == s), key=lambda r: r["request_rate"]):
            xs = np.sort(np.asarray(r.get(key, []), dtype=float))
            if xs.size:
                ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post",
                        label=f"{r['request_rate']:g} req/s")
        ax.set_title(s, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(f"{label} (ms)")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of requests")
    for ax in list(axes.flat)[len(systems):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_over_time(rows: list[dict], path: Path) -> Path:
    fig, (ax_o, ax_kv, ax_bw) = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"decode": "-", "prefill": ":", "executor": "--", "vllm": "-."}
    for i, s in enumerate(_systems(rows)):
        row = max((r for r in rows if r["system"] == s), key=lambda r: r["request_rate"])
        samples, color = row.get("samples") or [], colors[i % len(colors)]
        label = f"{s} @ {row['request_rate']:g}"
        ts = [x["t"] for x in samples]
        if any(x.get("offload_ratio") is not None for x in samples):
            ax_o.plot(ts, [x.get("offload_ratio") for x in samples], color=color, label=label)
        for inst in dict.fromkeys(k for x in samples for k in x.get("kv_use", {})):
            pts = [(x["t"], x["kv_use"][inst]) for x in samples if inst in x.get("kv_use", {})]
            ax_kv.plot(*zip(*pts), styles.get(inst.rstrip("0123456789"), "-"), color=color,
                       label=f"{s} {inst}")
        for inst in dict.fromkeys(k for x in samples for k in x.get("attn_gbs", {})):
            pts = [(x["t"], x["attn_gbs"][inst]) for x in samples if inst in x.get("attn_gbs", {})]
            ax_bw.plot(*zip(*pts), "--", color=color, label=f"{s} {inst}")
    ax_o.set_ylabel("offload ratio\n(running decode reqs)")
    ax_kv.set_ylabel("KV capacity used")
    ax_bw.set_ylabel("executor attention\nKV read (GB/s)")
    ax_bw.set_xlabel("time since the run started (s)")
    for ax in (ax_o, ax_kv, ax_bw):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(result: dict, out_dir: str | Path = "docs") -> list[Path]:
    """Write the four figures into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    return [plot_throughput(rows, out / "serving_throughput.png"),
            plot_cdf(rows, "ttfts_ms", "TTFT", out / "serving_ttft_cdf.png"),
            plot_cdf(rows, "tpots_ms", "TPOT", out / "serving_tpot_cdf.png"),
            plot_over_time(rows, out / "serving_over_time.png")]


def plot_offload_rates(result: dict, out_dir: str | Path = "docs") -> list[Path]:
    """``bench offload`` over request rates: output tok/s and TPOT p90 by rate, a line per
    system (``offload_rates.png``)."""
    rows = [r for r in result["rows"] if np.isfinite(r["rate"])]
    if not rows:
        return []
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for s in _systems(rows):
        rs = sorted((r for r in rows if r["system"] == s), key=lambda r: r["rate"])
        rates = [r["rate"] for r in rs]
        ax_t.plot(rates, [r["output_tok_s"] for r in rs], "o-", label=s)
        ax_p.plot(rates, [r["tpot_p90_ms"] for r in rs], "o-", label=s)
    slo = result["workload"].get("tpot_slo_ms")
    if slo:
        ax_p.axhline(slo, color="grey", ls="--", lw=1, label=f"SLO {slo:g} ms")
    ax_t.set_ylabel("output tok/s")
    ax_p.set_ylabel("TPOT p90 (ms)")
    for ax in (ax_t, ax_p):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "offload_rates.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
