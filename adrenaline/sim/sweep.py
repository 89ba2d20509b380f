"""Runs, sweeps and deployment plans on top of Simulation.

A *system* string names a policy and its options: ``none``, ``static@ratio=0.5``,
``load_aware@tpot_slo_ms=100``, or a user policy ``pkg.mod:Class@key=value``.
A *layout* is ``xPyD`` (x prefill, y decode instances).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import replace

from adrenaline.bench.serving_metrics import Slo
from adrenaline.sim.results import summarize
from adrenaline.sim.simulator import SimConfig, Simulation
from adrenaline.sim.workload import Workload, arrivals


def parse_system(text: str) -> tuple[str, dict]:
    name, _, opts = text.partition("@")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"system {text!r}: option {item!r} is not key=value")
        options[key] = float(value)
    return name, options


def parse_layout(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)P(\d+)D", text.strip(), re.IGNORECASE)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"layout {text!r}: expected xPyD, e.g. 2P2D")
    return int(m.group(1)), int(m.group(2))


def with_system(cfg: SimConfig, system: str) -> SimConfig:
    policy, options = parse_system(system)
    executor = cfg.executor if policy not in ("none", "least_loaded") else False
    return replace(cfg, policy=policy, policy_options=options, executor=executor)


def run_point(cfg: SimConfig, w: Workload, slo: Slo | None = None, label: str = "") -> dict:
    """One simulated run as a row: what it was, the serving metrics, the simulator's extras."""
    t0 = time.perf_counter()
    sim = Simulation(cfg).run(arrivals(w), w.max_concurrency)
    row = {"system": label or cfg.policy, "layout": f"{cfg.num_prefill}P{cfg.num_decode}D",
           "request_rate": w.request_rate, "max_concurrency": w.max_concurrency,
           "config": {k: v for k, v in vars(cfg).items()}, **summarize(sim, slo),
           "samples": sim.samples, "sim_wall_s": time.perf_counter() - t0}
    return row


def sweep(base: SimConfig, w: Workload, systems: list[str], rates: list[float],
          layouts: list[str] | None = None, executor_kv: list[int | None] | None = None,
          slo: Slo | None = None, progress=None) -> list[dict]:
    rows = []
    for layout, ekv, system, rate in itertools.product(
            layouts or [f"{base.num_prefill}P{base.num_decode}D"],
            executor_kv or [base.executor_kv_tokens],
            systems, rates):
        p, d = parse_layout(layout)
        cfg = with_system(replace(base, num_prefill=p, num_decode=d, executor_kv_tokens=ekv),
                          system)
        row = run_point(cfg, replace(w, request_rate=rate), slo, label=system)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def app_args(cfg: SimConfig) -> dict:
    """The `serve run` app args of a simulated deployment (serve_configs/*.yaml's `args:`)."""
    from adrenaline.sim.cost import CostModel
    from adrenaline.sim.hardware import get_profile
    from adrenaline.sim.models import load_model
    from adrenaline.sim.simulator import kv_budgets

    cost = CostModel(load_model(cfg.model, cfg.dtype), get_profile(cfg.hardware))
    pre, dec, exe = kv_budgets(cfg, cost)
    gpu = cfg.hardware != "cpu"
    engine = {"block_size": cfg.block_size, "max_num_seqs": cfg.max_num_seqs,
              "max_num_batched_tokens": cfg.max_num_batched_tokens}
    args = {"model": cfg.model, "device": "cuda" if gpu else "cpu",
            "policy": cfg.policy, "policy_options": dict(cfg.policy_options),
            "prefill": {"num_instances": cfg.num_prefill, "num_gpus": 1 if gpu else 0,
                        "engine": {**engine, "kv_cache_tokens": pre}},
            "decode": {"num_instances": cfg.num_decode, "num_gpus": 1 if gpu else 0,
                       "engine": {**engine, "kv_cache_tokens": dec}},
            "executor": {"enabled": cfg.executor, "engine": {"kv_cache_tokens": max(exe, 16)}}}
    if cfg.dtype:
        args["dtype"] = cfg.dtype
    return args


def plan(base: SimConfig, w: Workload, num_gpus: int, systems: list[str], slo: Slo,
         rates: list[float], progress=None) -> dict:
    """Every xPyD split of ``num_gpus`` x every system x every rate; the best is the one with
    the highest goodput (requests/s meeting the SLO); ties go to fewer prefill instances."""
    layouts = [f"{p}P{num_gpus - p}D" for p in range(1, num_gpus)]
    rows = sweep(base, w, systems, rates, layouts, slo=slo, progress=progress)
    best = max(rows, key=lambda r: (r["metrics"]["request_goodput"] or 0.0,
                                    -int(r["layout"].split("P")[0])))
    p, d = parse_layout(best["layout"])
    cfg = with_system(replace(base, num_prefill=p, num_decode=d), best["system"])
    return {"best": {k: best[k] for k in ("system", "layout", "request_rate")},
            "best_metrics": best["metrics"], "app_args": app_args(cfg), "rows": rows}


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
