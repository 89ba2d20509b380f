"""Figures of simulated runs (matplotlib Agg; reads result rows only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adrenaline.bench.plots import plot_throughput  # noqa: E402,F401  (rate sweeps)


def plot_over_time(row: dict, path: Path) -> Path:
    """KV use per role (mean and max over instances), executor KV read bandwidth, decode batch."""
    s = row["samples"]
    fig, (ax_kv, ax_bw, ax_b) = plt.subplots(1, 3, figsize=(14, 3.6))
    t = [x["t"] for x in s]
    for role in ("prefill", "decode", "executor"):
        per = [[v for k, v in x["kv_use"].items() if k.startswith(role)] for x in s]
        if not per or not per[0]:
            continue
        line, = ax_kv.plot(t, [sum(p) / len(p) for p in per], label=f"{role} mean")
        ax_kv.plot(t, [max(p) for p in per], "--", color=line.get_color(), label=f"{role} max")
    bw = [(b["executor_read_bytes"] - a["executor_read_bytes"]) / max(b["t"] - a["t"], 1e-9) / 1e9
          for a, b in zip(s, s[1:])]
    ax_bw.plot(t[1:], bw)
    batches = [sum(x["decode_batch"].values()) / max(len(x["decode_batch"]), 1) for x in s]
    ax_b.plot(t, batches)
    for ax, label in ((ax_kv, "KV use (share of pool)"), (ax_bw, "executor KV read (GB/s)"),
                      (ax_b, "mean decode batch")):
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_kv.legend(fontsize=7)
    fig.suptitle(f"{row['system']} {row['layout']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_series(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
                path: Path, title: str = "") -> Path:
    """One line per name through its (x, y) points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
