"""The paper's setting, simulated: Llama-2 7B and 13B on A100-80GB, 1P1D and 2P2D,
ShareGPT-like or long-decode lengths (`python -m adrenaline.sim paper [--dataset ...]`;
results in docs/SIMULATION.md).

1. ``none`` vs ``load_aware`` over request rates: the highest output throughput whose
   TPOT p90 meets the SLO, and the ratio of the two. ``load_aware`` is the live policy
   (policy/load_aware.py) on the simulated start-up profile (batches up to max_num_seqs);
   ``load_aware_fast``: the same with a 20 us exchange per layer (a what-if: the profile's
   exchange is the H200 fit's, measured through ColocatedPD's thread hand-off);
   ``load_aware_capacity``: rule (d) off (``hide_remote: false``), offloading for KV
   capacity even where the step then waits on the executor.
2. ``static`` over offload ratios at a saturating rate: throughput and TPOT by ratio.
"""

from __future__ import annotations

from pathlib import Path

from adrenaline.sim.simulator import SimConfig
from adrenaline.sim.sweep import run_point
from adrenaline.sim.workload import Workload

MODELS = ("llama2-7b", "llama2-13b")
LAYOUTS = ((1, 1), (2, 2))
RATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)  # per prefill instance
# What-if: a per-layer exchange of 20 us (the H200 fit measured 0.74 ms through ColocatedPD).
FAST_EXCHANGE_S = 20e-6
RATIOS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)


def _slim(row: dict) -> dict:
    keep = ("output_throughput", "request_throughput", "request_goodput", "ttft_p50_ms",
            "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "completed")
    return {"system": row["system"], "layout": row["layout"], "request_rate": row["request_rate"],
            **{k: row["metrics"][k] for k in keep},
            **{k: row[k] for k in ("offload_ratio", "mean_decode_batch", "b_max", "ob_mem",
                                   "kv_budgets_tokens", "num_preemptions")}}


def best_under_slo(rows: list[dict], tpot_slo_ms: float) -> dict | None:
    ok = [r for r in rows if r["tpot_p90_ms"] <= tpot_slo_ms and r["completed"] > 0]
    return max(ok, key=lambda r: r["output_throughput"], default=None)


def run(num_prompts: int = 2000, tpot_slo_ms: float = 100.0, input_median: int = 200,
        output_median: int = 200, progress=print, dataset: str = "sharegpt-synthetic",
        rates: tuple[float, ...] = RATES) -> dict:
    out: dict = {"settings": {"hardware": "a100-80gb", "dataset": dataset,
                              "input_median": input_median, "output_median": output_median,
                              "num_prompts": num_prompts, "tpot_slo_ms_p90": tpot_slo_ms,
                              "executor_share": 0.25},
                 "slo": [], "ratios": []}
    for model in MODELS:
        for p, d in LAYOUTS:
            base = SimConfig(model=model, hardware="a100-80gb", num_prefill=p, num_decode=d,
                             sample_interval_s=5.0)
            w = Workload(dataset=dataset, num_prompts=num_prompts,
                         input_len=input_median, output_len=output_median)
            systems = {"none": SimConfig(**{**vars(base), "policy": "none"}),
                       "load_aware": SimConfig(**{**vars(base), "policy": "load_aware",
                                                  "executor": True,
                                                  "policy_options": {"tpot_slo_ms": tpot_slo_ms}})}
            systems["load_aware_fast"] = SimConfig(**{**vars(systems["load_aware"]),
                                                      "exchange_layer_s": FAST_EXCHANGE_S})
            systems["load_aware_capacity"] = SimConfig(**{
                **vars(systems["load_aware"]),
                "policy_options": {"tpot_slo_ms": tpot_slo_ms, "hide_remote": False}})
            rows = {}
            for name, cfg in systems.items():
                rows[name] = [_slim(run_point(cfg, Workload(**{**vars(w), "request_rate": r * p}),
                                              label=name)) for r in rates]
                progress(f"{model} {p}P{d}D {name}: "
                         + " ".join(f"{r['output_throughput']:.0f}" for r in rows[name]))
            best = {k: best_under_slo(v, tpot_slo_ms) for k, v in rows.items()}
            gain = {k: (best[k]["output_throughput"] / best["none"]["output_throughput"]
                        if best["none"] and best[k] else None) for k in systems if k != "none"}
            out["slo"].append({"model": model, "layout": f"{p}P{d}D", "rows": rows,
                               "best": best, "gain": gain})
            sat = rates[-1] * p  # a rate past what either system sustains
            ratio_rows = []
            for ratio in RATIOS:
                cfg = SimConfig(**{**vars(base), "policy": "static", "executor": True,
                                   "policy_options": {"ratio": ratio}})
                ratio_rows.append({"ratio": ratio, **_slim(run_point(
                    cfg, Workload(**{**vars(w), "request_rate": sat}), label="static"))})
            progress(f"{model} {p}P{d}D static ratios: "
                     + " ".join(f"{r['output_throughput']:.0f}" for r in ratio_rows))
            out["ratios"].append({"model": model, "layout": f"{p}P{d}D", "request_rate": sat,
                                  "rows": ratio_rows})
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    from adrenaline.sim.plots import plot_series

    paths = []
    for case in result["slo"]:
        series = {name: [(r["request_rate"], r["output_throughput"]) for r in rows]
                  for name, rows in case["rows"].items()}
        series.update({f"{name} TPOT p90 (ms)": [(r["request_rate"], r["tpot_p90_ms"])
                                                 for r in rows]
                       for name, rows in case["rows"].items()})
        tag = f"{case['model']}-{case['layout']}".lower()
        paths.append(plot_series(series, "request rate (req/s)", "output tok/s  |  TPOT p90 (ms)",
                                 out_dir / f"sim_paper_{tag}_rate.png",
                                 f"{case['model']} {case['layout']} A100-80GB (simulated)"))
    series = {f"{c['model']} {c['layout']}": [(r["ratio"], r["output_throughput"])
                                               for r in c["rows"]]
              for c in result["ratios"]}
    paths.append(plot_series(series, "static offload ratio", "output tok/s",
                             out_dir / "sim_paper_offload_ratio.png",
                             "throughput by offload ratio, A100-80GB (simulated)"))
    return paths
