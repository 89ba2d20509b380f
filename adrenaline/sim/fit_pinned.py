"""The ``cpu-pinned`` profile: this CPU with each role on a core of its own.

Fitted on a pinned `bench offload` run's start-up profile (the cluster measures
it for load_aware: decode step without attention by batch, attention seconds
per KV token on the decode core and on the executor, the exchange) and on that
run's TTFT for the prefill speed, with the decode attention per KV token taken
from a second live run (a decode-heavy one: its none step beyond the profile's
base, over the KV its steps read); then checked on a third run (the latest
decode-heavy live run of docs/BENCHMARKS.md). Nothing is fitted to the checked
run's throughput, TPOT or batch.

The cost model's terms are solved, not searched:
  base(b) = intercept + slope x b            (least squares over the profiled batches)
  intercept -> weights streaming (eff_mem);  slope -> per-request cost beyond the linear
  layers' FLOPs at the measured matmul ceiling (seq_overhead_s);
  decode attention per KV token -> eff_attn; the executor's -> its bandwidth share;
  exchange per step / layers -> exchange_layer_s;
  prefill FLOP efficiency: bisection on the fitting run's `none` TTFT p50.
Pinned roles run on dedicated cores (``cores = 0``), as devices of their own.

``cpu-pinned-kernel`` (the CPU decode kernel's runs) is built the same way from one
run's profile, and also picks the form of the exchange term (hidden behind local
attention or not, sim/cost.py) by the wait per layer that run's load_aware row measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from adrenaline.policy.profile import ClusterProfile
from adrenaline.sim.cost import CostModel
from adrenaline.sim.hardware import HardwareProfile
from adrenaline.sim.models import load_model
from adrenaline.sim.results import summarize
from adrenaline.sim.simulator import SimConfig, Simulation
from adrenaline.sim.workload import Workload, arrivals

CHECK_KEYS = ("output_tok_s", "tpot_p50_ms", "mean_decode_batch")
# Reported beside them (not held to a tolerance): what explains a miss.
REPORT_KEYS = ("offload_ratio", "decode_step_ms", "remote_wait_per_layer_ms")
SYSTEMS = {"none": ("none", {}), "load_aware": ("load_aware", None)}


def run_model(run: dict) -> str:
    """The model of a `bench offload` result, as load_model takes it (a built-in name, or
    the config.json of the served model's directory)."""
    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.sim.models import CONFIGS

    name = run.get("model", "smollm2-135m-instruct")
    return name if name in CONFIGS else str(resolve_model_dir(name) / "config.json")


def _profile_row(run: dict) -> dict:
    row = next((r for r in run["rows"] if r.get("profile")), None)
    if row is None:
        raise ValueError("fit: the run has no row with a start-up profile (run load_aware)")
    return row["profile"]


def _base_at(prof: dict, batch: float) -> float:
    """The start-up profile's base step (seconds) at ``batch`` (as the policy reads it)."""
    base = {int(b): ms / 1e3 for b, ms in prof["base_step_ms"].items()}
    return ClusterProfile(base, [], [], 0.0, [], []).base_s(batch)


def live_attention_s_per_token(run: dict) -> float:
    """Seconds of decode attention per KV token in a live long-decode run's ``none`` row:
    its step beyond the start-up profile's base at its mean batch, over the KV a step
    reads on average (every request's prompt + the tokens decoded so far, summed over its
    steps, from the run's own seeded lengths, over the run's steps)."""
    from adrenaline.bench.serving_workloads import long_decode_lengths

    w = run["workload"]
    if w["dataset"] != "long-decode":
        raise ValueError("live attention: a long-decode run is needed")
    none = next(r for r in run["rows"] if r["system"] == "none")
    lengths = long_decode_lengths(w["num_requests"], w["seed"])
    kv = sum(i * o + o * (o - 1) / 2 for i, o in lengths)
    steps = sum(o for _, o in lengths) / none["mean_decode_batch"]
    base = _base_at(_profile_row(run), none["mean_decode_batch"])
    return (none["decode_step_ms"] / 1e3 - base) / (kv / steps)


def solve_profile(run: dict, roofline: dict, model_path: str,
                  attention_run: dict | None = None, name: str = "cpu-pinned"
                  ) -> HardwareProfile:
    """The cost model's rates from the run's start-up profile (all but the prefill speed);
    with ``attention_run``, the decode attention per KV token from that live run instead
    (for runs whose start-up profile timed equal contexts in a fresh pool, about half the
    served rate on this machine; profiles since 065474d time attention as served)."""
    prof = _profile_row(run)
    model = load_model(model_path, run.get("dtype", "bfloat16"))
    bw = roofline["copy_bandwidth_gbs"]
    peak = roofline["matmul_peak_gflops"]["bfloat16"] / 1e3
    base = sorted((int(b), ms / 1e3) for b, ms in prof["base_step_ms"].items())
    slope, intercept = np.polyfit([b for b, _ in base], [t for _, t in base], 1)
    decode_tok = model.linear_flops_per_token / (peak * 1e12)
    attn = prof["decode_attn_us_per_token"][0] / 1e6
    exec_attn = prof["executor_attn_us_per_token"][0] / 1e6
    seen = 1.0
    if attention_run is not None:  # the executor keeps its measured speed relative to decode
        live = live_attention_s_per_token(attention_run)
        seen = attn / live  # the policy still reads the start-up profile's rate
        exec_attn *= live / attn
        attn = live
    eff_attn = model.kv_bytes_per_token / (bw * 1e9 * attn)
    return HardwareProfile(
        name=name, mem_gib=24.0, mem_bw_gbs=bw, flops_tflops=peak,
        eff_mem=min(model.step_weight_bytes / (bw * 1e9 * max(intercept, 1e-6)), 1.0),
        eff_attn=min(eff_attn, 1.0), eff_flops_decode=1.0,
        seq_overhead_s=max(slope - decode_tok, 0.0),
        exchange_layer_s=prof["exchange_ms"] / 1e3 / model.layers,
        link_gbs=2.0, handoff_latency_s=1e-3,
        executor_bw_curve=((0.0, 0.0), (1.0, attn / exec_attn)),
        executor_steals_compute=False, default_executor_share=1.0, cores=0.0,
        profiled_attention_ratio=seen)


def sim_row(hw: HardwareProfile, run: dict, system: str, model_path: str | None = None
            ) -> dict:
    """The run's layout and requests (bench offload: 1 prefill + executor, 1 decode), all
    from its ``workload`` and the system's row (its rate)."""
    w = run["workload"]
    policy, options = SYSTEMS[system]
    if options is None:  # load_aware as it ran (runs before step feedback: without it)
        options = {"tpot_slo_ms": w["tpot_slo_ms"],
                   "step_feedback": w.get("step_feedback", False),
                   "hide_remote": w.get("hide_remote", True)}
    rate = next(r["rate"] for r in run["rows"] if r["system"] == system)
    cfg = SimConfig(model=model_path or run_model(run), dtype=run.get("dtype", "bfloat16"),
                    hardware=hw.name, policy=policy, policy_options=options,
                    executor=system != "none",
                    prefill_kv_tokens=w["prefill_kv_tokens"],
                    decode_kv_tokens=w["decode_kv_tokens"],
                    executor_kv_tokens=w["executor_kv_tokens"],
                    block_size=w.get("block_size", 16),  # before --block-size: the default
                    max_num_seqs=w.get("max_num_seqs", 64), sample_interval_s=0.5,
                    prefill_when_admissible=w.get("prefill_when_admissible", False))
    dataset = "random" if w["dataset"] == "fixed" else w["dataset"]  # fixed: exact lengths
    wl = Workload(dataset=dataset, num_prompts=w["num_requests"], input_len=w["input_len"],
                  output_len=w["output_len"], seed=w["seed"],
                  request_rate=float("inf") if rate in ("inf", float("inf")) else float(rate))
    r = summarize(Simulation(cfg, hw=hw).run(arrivals(wl)))
    m = r["metrics"]
    return {"output_tok_s": m["output_throughput"], "tpot_p50_ms": m["tpot_p50_ms"],
            "ttft_p50_ms": m["ttft_p50_ms"], "mean_decode_batch": r["mean_decode_batch"],
            "offload_ratio": r["offload_ratio"], "decode_step_ms": r["decode_step_ms"],
            "remote_wait_per_layer_ms": r["remote_wait_per_layer_ms"],
            "num_requests": m["completed"]}


def fit_cpu_pinned(fit_file: Path, roofline_file: Path, model_path: str | None = None,
                   attention_file: Path | None = None) -> HardwareProfile:
    """``attention_file``: a live long-decode run the decode attention rate is taken from
    (``live_attention_s_per_token``); without it, the start-up profile's."""
    run = json.loads(Path(fit_file).read_text())
    model_path = model_path or run_model(run)
    attention_run = json.loads(Path(attention_file).read_text()) if attention_file else None
    hw = solve_profile(run, json.loads(Path(roofline_file).read_text()), model_path,
                       attention_run)
    hw = fit_prefill(hw, run, model_path)
    live = next(r for r in run["rows"] if r["system"] == "none")
    fitted = sim_row(hw, run, "none", model_path)
    return replace(hw, fitted_on={
        "files": [Path(fit_file).name, Path(roofline_file).name]
        + ([Path(attention_file).name] if attention_file else []),
        "dates": [run["date"]] + ([attention_run["date"]] if attention_run else []),
        "from": "start-up profile; prefill from none's TTFT p50"
        + ("; decode attention per KV token from the attention file's none step"
           if attention_file else ""),
        "fit_error": {"none": {k: fitted[k] / live[k] - 1
                               for k in CHECK_KEYS + ("ttft_p50_ms",) if live.get(k)}}})


def bisect(lo: float, hi: float, iters: int, answer_above) -> float:
    """The midpoint of [lo, hi] after ``iters`` halvings, keeping the half where
    ``answer_above(mid)`` says the sought value lies (above ``mid`` or not)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if answer_above(mid) else (lo, mid)
    return (lo + hi) / 2


def fit_prefill(hw: HardwareProfile, run: dict, model_path: str) -> HardwareProfile:
    """``hw`` with the prefill FLOP efficiency at which the run's ``none`` TTFT p50 comes
    out as live (bisection: TTFT falls as the efficiency rises)."""
    live = next(r for r in run["rows"] if r["system"] == "none")["ttft_p50_ms"]
    eff = bisect(0.01, 1.0, 20, lambda mid: sim_row(replace(hw, eff_flops_prefill=mid), run,
                                                    "none", model_path)["ttft_p50_ms"] > live)
    return replace(hw, eff_flops_prefill=eff)


def fit_cpu_pinned_served(profile_file: Path, fit_file: Path, roofline_file: Path,
                          model_path: str | None = None) -> HardwareProfile:
    """``cpu-pinned-served``: every rate from ``profile_file``'s start-up profile, one that
    times attention on a batch laid out as served (engine/step_profile.py), so the
    policy reads the rates the steps pay (no ``profiled_attention_ratio``); the prefill
    speed from ``fit_file``'s ``none`` TTFT p50, as ``cpu-pinned``."""
    run = json.loads(Path(profile_file).read_text())
    model_path = model_path or run_model(run)
    fit_run = json.loads(Path(fit_file).read_text())
    hw = solve_profile(run, json.loads(Path(roofline_file).read_text()), model_path,
                       name="cpu-pinned-served")
    hw = fit_prefill(hw, fit_run, model_path)
    return replace(hw, fitted_on={
        "files": [Path(profile_file).name, Path(fit_file).name, Path(roofline_file).name],
        "dates": [run["date"], fit_run["date"]],
        "from": "the first file's start-up profile (attention timed as served); prefill "
                "from the second file's none TTFT p50"})


def fit_cpu_pinned_kernel(profile_file: Path, prefill_file: Path, roofline_file: Path,
                          model_path: str | None = None, name: str = "cpu-pinned-kernel",
                          fit_offload_overhead: bool = False) -> HardwareProfile:
    """``cpu-pinned-kernel``: every rate from ``profile_file``'s start-up profile (a run on
    the CPU decode kernel, attention timed as served), as ``cpu-pinned-served``; the
    prefill speed from ``prefill_file``'s ``none`` TTFT p50, as ``cpu-pinned``; and the
    exchange's form (``exchange_hidden``) whose simulated wait per layer of an offloaded
    step is nearer the one ``profile_file``'s load_aware row measured. With
    ``fit_offload_overhead``, also ``offload_seq_overhead_s``: the decode's cost per
    offloaded request per step at which load_aware's simulated mean decode step comes out
    as that row's (bisection). ``fitted_on`` keeps the error on ``profile_file`` itself,
    both systems (reference, not a check)."""
    run = json.loads(Path(profile_file).read_text())
    prefill_run = json.loads(Path(prefill_file).read_text())
    model_path = model_path or run_model(run)
    hw = solve_profile(run, json.loads(Path(roofline_file).read_text()), model_path,
                       name=name)
    hw = fit_prefill(hw, prefill_run, run_model(prefill_run))
    live_wait = next(r for r in run["rows"] if r.get("profile"))["remote_wait_per_layer_ms"]
    waits = {h: sim_row(replace(hw, exchange_hidden=h), run, "load_aware",
                        model_path)["remote_wait_per_layer_ms"] for h in (True, False)}
    hw = replace(hw, exchange_hidden=min(waits, key=lambda h: abs(waits[h] - live_wait)))
    if fit_offload_overhead:
        hw = _fit_offload_overhead(hw, run, model_path)
    fit_error = {}
    for live in run["rows"]:
        if live["system"] in SYSTEMS:
            sim = sim_row(hw, run, live["system"], model_path)
            fit_error[live["system"]] = {k: sim[k] / live[k] - 1 for k in CHECK_KEYS
                                         + ("ttft_p50_ms",) + REPORT_KEYS if live.get(k)}
    return replace(hw, fitted_on={
        "files": [Path(profile_file).name, Path(prefill_file).name, Path(roofline_file).name],
        "dates": [run["date"], prefill_run["date"]],
        "from": "the first file's start-up profile (attention timed as served); prefill "
                "from the second file's none TTFT p50; exchange_hidden: the form whose "
                "simulated wait per layer is nearer the first file's load_aware row's"
                + ("; offload_seq_overhead_s: load_aware's mean decode step as the first "
                   "file's" if fit_offload_overhead else ""),
        "remote_wait_per_layer_ms": {"live": live_wait, "sim_hidden": waits[True],
                                     "sim_not_hidden": waits[False]},
        "fit_error": fit_error})


def _fit_offload_overhead(hw: HardwareProfile, run: dict, model_path: str,
                          hi_s: float = 20e-3) -> HardwareProfile:
    """``hw`` with the offload_seq_overhead_s at which the run's load_aware mean decode step
    comes out as live (bisection: the simulated step grows with it)."""
    live = next(r for r in run["rows"] if r["system"] == "load_aware")["decode_step_ms"]
    cost = bisect(0.0, hi_s, 16, lambda mid: sim_row(
        replace(hw, offload_seq_overhead_s=mid), run, "load_aware", model_path)
        ["decode_step_ms"] < live)
    return replace(hw, offload_seq_overhead_s=cost)


def check_cpu_pinned(hw: HardwareProfile, check_file: Path, model_path: str | None = None
                     ) -> list[dict]:
    """Simulated against live on a run the fit did not use, per system (every row of a
    system the simulator plays; the workload, model and layout from the file)."""
    run = json.loads(Path(check_file).read_text())
    rows = []
    for live in run["rows"]:
        if live["system"] not in SYSTEMS:
            continue
        sim = sim_row(hw, run, live["system"], model_path)
        if sim["num_requests"] != live.get("num_requests", sim["num_requests"]):
            raise ValueError(f"check: {sim['num_requests']} simulated requests finished of "
                             f"{live['num_requests']} ({Path(check_file).name})")
        rows.append({"system": live["system"], **{
            k: {"live": live[k], "sim": sim[k], "err": _err(sim[k], live[k])}
            for k in CHECK_KEYS + REPORT_KEYS if live.get(k) is not None}})
    return rows


def _err(sim: float, live: float) -> float:
    return sim / live - 1 if live else (0.0 if sim == live else math.inf)
