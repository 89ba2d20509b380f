"""Fit hardware profiles to this project's measurements, and check them on data kept apart.

CPU (this machine): the efficiencies and overheads are fitted by running the
simulator itself on the workload of docs/bench-offload-decode768.json (`bench
offload` with a 768-token decode budget) and minimising the log error of each
row's output tok/s, TPOT p50, TTFT p50, mean decode batch and decode step time
(Nelder-Mead). Peaks are docs/bench-roofline.json's measured ceilings. Checked
on docs/bench-offload.json (1536-token budget) and docs/bench-serving-sweep.json.

H200: docs/gpu-check.json's engine rows (decode step of its 1B model at batches
1, 8, 32, 128, 517-token contexts). Weight and KV streaming run at the
attention-bandwidth stage's measured bandwidth, matmuls at the ceilings stage's
measured TFLOP/s (both as shares of the spec-sheet peaks); the per-layer and
per-request overheads are solved from batches 1 and 128 and checked on 8 and 32.
The prefill FLOP efficiency and the per-layer offload
exchange come from the offload_tput stage (one measurement each: fitted, not
checked). Efficiencies are stored relative to the spec-sheet peaks so A100 and
H100 can take them.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from adrenaline.bench.serving_sweep import ADRENALINE_SYSTEMS
from adrenaline.sim.cost import CostModel
from adrenaline.sim.fit_pinned import (bisect, check_cpu_pinned, fit_cpu_pinned,
                                      fit_cpu_pinned_kernel,
                                      fit_cpu_pinned_served)
from adrenaline.sim.hardware import PROFILES_PATH, SPEC_SHEETS, HardwareProfile
from adrenaline.sim.models import load_model
from adrenaline.sim.results import summarize
from adrenaline.sim.simulator import SimConfig, Simulation
from adrenaline.sim.workload import Workload, arrivals

DOCS = Path(__file__).resolve().parents[2] / "docs"
OFFLOAD_KEYS = ("output_tok_s", "tpot_p50_ms", "mean_decode_batch")  # the checked fields
FIT_KEYS = OFFLOAD_KEYS + ("ttft_p50_ms", "decode_step_ms")
SWEEP_KEYS = ("output_throughput", "ttft_p50_ms", "tpot_p50_ms")
CPU_PARAMS = ("eff_mem", "eff_attn", "eff_flops_decode", "eff_flops_prefill", "step_overhead_s",
              "seq_overhead_s", "exchange_layer_s", "frontend_cores")
SWEEP_FIT_RATE = 1.0  # the serving sweep's rows at this rate are fitting data; the rest check
# cpu-pinned (sim/fit_pinned.py): fitted on one pinned run, checked on the decode-heavy one.
PINNED_FIT_FILE = "bench-offload-pinned-fit.json"
PINNED_ATTENTION_FILE = "bench-offload-long-decode.json"  # 32 requests, no prefill gate
PINNED_CHECK_FILE = "bench-offload-long-decode-64.json"  # 64 requests, gate, niceness -5
# Attention timed as served in the start-up profile, 64-token blocks: decode KV for 16
# requests (the profile's run) and for 8 (the checked run)
SERVED_PROFILE_FILE = "bench-offload-long-decode-served.json"
SERVED_CHECK_FILE = "bench-offload-long-decode-served-kv8.json"
# The CPU decode kernel's runs (docs/BENCHMARKS.md): fitted on run 1's start-up profile,
# checked on run 3 (run 2's profile was timed under interference: neither).
KERNEL_PROFILE_FILE = "bench-offload-long-decode-kernel.json"
KERNEL_CHECK_FILE = "bench-offload-long-decode-kernel-rounds.json"
# The kernel that prefetches across scattered pages (docs/BENCHMARKS.md): fitted on its
# first run (niceness -5, the executor polling between layers), checked on the run at
# niceness -20 with the executor napping between layers.
PREFETCH_PROFILE_FILE = "bench-offload-long-decode-prefetch.json"
PREFETCH_CHECK_FILE = "bench-offload-long-decode-pace.json"
# Each pinned profile and the run `sim validate` checks it on.
PINNED_CHECKS = {"cpu-pinned": PINNED_CHECK_FILE, "cpu-pinned-served": SERVED_CHECK_FILE,
                 "cpu-pinned-kernel": KERNEL_CHECK_FILE,
                 "cpu-pinned-prefetch": PREFETCH_CHECK_FILE}


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 200, tol: float = 1e-4):
    """Minimise f from x0 (a plain Nelder-Mead; the simulator is not differentiable)."""
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        refl = centroid + (centroid - pts[-1])
        fr = f(refl)
        if fr < vals[0]:
            exp = centroid + 2 * (centroid - pts[-1])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


# ---- CPU

def offload_config(workload: dict, system: str) -> tuple[SimConfig, Workload]:
    """`bench offload`'s layout (offload_bench.bench_system) and requests."""
    policy, options = ADRENALINE_SYSTEMS[system]
    n = workload["num_requests"]
    cfg = SimConfig(model="small", dtype="bfloat16", hardware="cpu", policy=policy,
                    policy_options=dict(options), executor=system != "none",
                    prefill_kv_tokens=workload["prefill_kv_tokens"],
                    decode_kv_tokens=workload["decode_kv_tokens"],
                    executor_kv_tokens=workload["executor_kv_tokens"], max_num_seqs=n,
                    sample_interval_s=0.5)
    return cfg, Workload(num_prompts=n, input_len=workload["input_len"],
                         output_len=workload["output_len"], seed=workload["seed"])


def sim_offload_row(hw: HardwareProfile, workload: dict, system: str) -> dict:
    cfg, w = offload_config(workload, system)
    r = summarize(Simulation(cfg, hw=hw).run(arrivals(w)))
    m = r["metrics"]
    return {"output_tok_s": m["output_throughput"], "tpot_p50_ms": m["tpot_p50_ms"],
            "ttft_p50_ms": m["ttft_p50_ms"], "mean_decode_batch": r["mean_decode_batch"],
            "decode_step_ms": r["decode_step_ms"], "offload_ratio": r["offload_ratio"]}


def sim_sweep_rows(hw: HardwareProfile, sweep: dict, rates=None) -> list[dict]:
    """`bench serving --sweep-rates`'s layout (serving.sweep_app_args), simulated (every row,
    or those at ``rates``)."""
    w, out = sweep["workload"], []
    for row in sweep["rows"]:
        if row["system"] not in ADRENALINE_SYSTEMS or (rates and row["request_rate"] not in rates):
            continue
        policy, options = ADRENALINE_SYSTEMS[row["system"]]
        cfg = SimConfig(model="small", dtype="bfloat16", hardware="cpu", policy=policy,
                        policy_options=dict(options), executor=row["system"] != "none",
                        prefill_kv_tokens=8192, decode_kv_tokens=1536, executor_kv_tokens=8192,
                        sample_interval_s=0, http=True)
        wl = Workload(dataset=w["dataset"], num_prompts=w["num_prompts"], input_len=w["input_len"],
                      output_len=w["output_len"], range_ratio=w["range_ratio"], seed=w["seed"],
                      request_rate=row["request_rate"], burstiness=row["burstiness"])
        m = summarize(Simulation(cfg, hw=hw).run(arrivals(wl), row["max_concurrency"]))["metrics"]
        out.append({"system": row["system"], "request_rate": row["request_rate"],
                    **{k: m[k] for k in SWEEP_KEYS}})
    return out


def cpu_peaks(roofline: dict) -> HardwareProfile:
    return HardwareProfile(name="cpu", mem_gib=24.0, mem_bw_gbs=roofline["copy_bandwidth_gbs"],
                           flops_tflops=roofline["matmul_peak_gflops"]["bfloat16"] / 1e3,
                           link_gbs=2.0, handoff_latency_s=1e-3, executor_bw_curve=((0, 0), (1, 1)),
                           executor_steals_compute=False, default_executor_share=1.0, cores=2.0)


def _with(base: HardwareProfile, x: np.ndarray) -> HardwareProfile:
    vals = np.exp(x)
    kw = {k: float(min(v, 1.0)) if k.startswith("eff") else float(v)
          for k, v in zip(CPU_PARAMS, vals)}
    return replace(base, **kw)


def _log_err(sim: dict, live: dict, keys) -> float:
    return sum(math.log(max(sim[k], 1e-9) / live[k]) ** 2 for k in keys if live.get(k))


def fit_cpu(fit_file: Path, roofline_file: Path, sweep_file: Path, iters: int = 150
            ) -> HardwareProfile:
    """Fitting data: every row of ``fit_file`` (bench offload) and the rows of ``sweep_file``
    (bench serving sweep) at SWEEP_FIT_RATE only."""
    data = json.loads(fit_file.read_text())
    sweep = json.loads(sweep_file.read_text())
    live_sweep = {(r["system"], r["request_rate"]): r["metrics"] for r in sweep["rows"]}
    base = cpu_peaks(json.loads(roofline_file.read_text()))

    def loss(x):
        hw = _with(base, x)
        err = sum(_log_err(sim_offload_row(hw, data["workload"], row["system"]), row, FIT_KEYS)
                  for row in data["rows"])
        return err + sum(_log_err(s, live_sweep[(s["system"], s["request_rate"])], SWEEP_KEYS)
                         for s in sim_sweep_rows(hw, sweep, (SWEEP_FIT_RATE,)))

    x0 = np.log([0.5, 0.3, 0.3, 0.5, 2e-3, 1e-4, 5e-4, 0.5])
    x, _ = nelder_mead(loss, x0, step=0.7, iters=iters)
    hw = _with(base, x)
    fitted = {r["system"]: sim_offload_row(hw, data["workload"], r["system"]) for r in data["rows"]}
    return replace(hw, fitted_on={
        "files": [fit_file.name, roofline_file.name, f"{sweep_file.name} (rate {SWEEP_FIT_RATE})"],
        "dates": [data["date"], sweep["date"]],
        "keys": list(FIT_KEYS),
        "fit_error": {s: {k: fitted[s][k] / r[k] - 1 for k in FIT_KEYS}
                      for s, r in ((r["system"], r) for r in data["rows"])}})


def check_cpu(hw: HardwareProfile, offload_file: Path, sweep_file: Path) -> dict:
    """Relative errors on the checking data (never used by fit_cpu)."""
    off = json.loads(offload_file.read_text())
    rows = []
    for live in off["rows"]:
        sim = sim_offload_row(hw, off["workload"], live["system"])
        rows.append({"system": live["system"],
                     **{k: {"live": live[k], "sim": sim[k], "err": sim[k] / live[k] - 1}
                        for k in OFFLOAD_KEYS}})
    sweep = json.loads(sweep_file.read_text())
    live_rows = {(r["system"], r["request_rate"]): r for r in sweep["rows"]}
    srows = []
    checked = sorted({r["request_rate"] for r in sweep["rows"]} - {SWEEP_FIT_RATE})
    for sim in sim_sweep_rows(hw, sweep, checked):
        live = live_rows[(sim["system"], sim["request_rate"])]
        srows.append({"system": sim["system"], "request_rate": sim["request_rate"],
                      **{k: {"live": live["metrics"][k], "sim": sim[k],
                             "err": sim[k] / live["metrics"][k] - 1,
                             "live_spread": _spread(live, k)} for k in SWEEP_KEYS}})
    return {"offload": {"file": offload_file.name, "rows": rows},
            "serving_sweep": {"file": sweep_file.name, "rows": srows}}


def _spread(live: dict, key: str) -> float | None:
    """The live run's own per-request spread of a p50 metric (interquartile range / median)."""
    sample = {"ttft_p50_ms": "ttfts_ms", "tpot_p50_ms": "tpots_ms"}.get(key)
    if not sample or not live.get(sample):
        return None
    q1, q2, q3 = np.percentile(live[sample], [25, 50, 75])
    return float((q3 - q1) / q2)


# ---- H200

H200_FIT_BATCHES = (1, 128)


def h200_engine_rows(gpu_check: dict) -> tuple[list[dict], dict]:
    eng = gpu_check["stages"]["engine"]["result"]
    return eng["rows"], eng


def _h200_decode_ms(hw: HardwareProfile, batch: int) -> float:
    # gpu_check stage_engine: 512-token prompts, decode steps timed around context 517.
    model = load_model("gpu-check-1b")
    return 1e3 * CostModel(model, hw).decode_s(batch, batch * 517)


def fit_h200(gpu_check_file: Path) -> HardwareProfile:
    d = json.loads(gpu_check_file.read_text())
    st = d["stages"]
    spec = SPEC_SHEETS["h200"]
    attn = st["attn_bw"]["result"]
    eff_stream = attn["gbs"] / spec["mem_bw_gbs"]  # measured KV-read bandwidth, share of peak
    curve = ([(0.0, 0.0)] + [(p["sm_share"], p["vs_full_device"]) for p in attn["partitions"]]
             + [(1.0, 1.0)])
    base = HardwareProfile(name="h200", **spec, eff_mem=eff_stream, eff_attn=eff_stream,
                           executor_bw_curve=tuple(curve), link_gbs=25.0,
                           handoff_latency_s=5e-5, default_executor_share=0.25)
    rows = {r["batch"]: r["graph_ms"] for r in st["engine"]["result"]["rows"]}
    model = load_model("gpu-check-1b")
    # Matmuls at the ceilings stage's measured share of the peak; what the step takes beyond
    # streaming and FLOPs is overhead: L x per layer + b x per request (two unknowns, solved
    # on two batch sizes).
    base = replace(base, eff_flops_decode=st["ceilings"]["result"]["bf16_matmul_tflops"]
                   / spec["flops_tflops"])
    rest = {b: (rows[b] - _h200_decode_ms(base, b)) / 1e3 for b in H200_FIT_BATCHES}
    a = np.array([[model.layers, b] for b in H200_FIT_BATCHES], dtype=float)
    layer, per_seq = np.linalg.solve(a, np.array([rest[b] for b in H200_FIT_BATCHES]))
    hw = replace(base, layer_overhead_s=float(max(layer, 0.0)),
                 seq_overhead_s=float(max(per_seq, 0.0)))
    hw = _fit_h200_offload(hw, st["offload_tput"]["result"])
    checked = {b: _h200_decode_ms(hw, b) / rows[b] - 1 for b in rows if b not in H200_FIT_BATCHES}
    return replace(hw, fitted_on={
        "files": [gpu_check_file.name], "dates": [d["date"]],
        "decode_fit_batches": list(H200_FIT_BATCHES),
        "fit_error": {b: _h200_decode_ms(hw, b) / rows[b] - 1 for b in H200_FIT_BATCHES},
        "check_error": checked})


def _colocated(hw: HardwareProfile, tput: dict, offload: bool) -> float:
    """Wall seconds of the offload_tput stage's run on one device (ColocatedPD): every prompt
    prefilled (8192-token steps), then decode; ``none`` in waves of the decode capacity,
    ``offload`` as one batch (capacity local, the rest on the executor's SM partition)."""
    n, cap = tput["requests"], tput["decode_capacity_requests"]
    p, o = tput["prompt_len"], tput["output_len"]
    cost = CostModel(load_model("gpu-check-1b"), hw, (tput["executor_sms"] or 64) / 132)
    per_step = max(8192 // p, 1)
    prefill = sum(cost.prefill_s([p] * min(per_step, n - i), [0] * min(per_step, n - i))
                  for i in range(0, n, per_step))
    steps = range(1, o)  # the first token comes from prefill
    if not offload:
        return prefill + -(-n // cap) * sum(cost.decode_s(cap, cap * (p + k)) for k in steps)
    rest = n - cap
    return prefill + sum(cost.decode_s(n, cap * (p + k), rest, rest * (p + k)) for k in steps)


def _fit_h200_offload(hw: HardwareProfile, tput: dict) -> HardwareProfile:
    rows = tput["rows"]
    # Prefill FLOP efficiency: the none run's wall time (bisection on a monotone function).
    hw = replace(hw, eff_flops_prefill=bisect(0.02, 1.0, 30, lambda mid: _colocated(
        replace(hw, eff_flops_prefill=mid), tput, offload=False) > rows["none"]["wall_s"]))
    return replace(hw, exchange_layer_s=bisect(0.0, 5e-3, 30, lambda mid: _colocated(
        replace(hw, exchange_layer_s=mid), tput, offload=True) < rows["offload"]["wall_s"]))


def fit_all(docs: Path = DOCS, out: Path = PROFILES_PATH, iters: int = 150,
            only: str | None = None) -> dict:
    """Refit every profile (or ``only`` that one, keeping the others as stored)."""
    fits = {"cpu": lambda: fit_cpu(docs / "bench-offload-decode768.json",
                                   docs / "bench-roofline.json",
                                   docs / "bench-serving-sweep.json", iters),
            "cpu-pinned": lambda: fit_cpu_pinned(docs / PINNED_FIT_FILE,
                                                 docs / "bench-roofline.json",
                                                 attention_file=docs / PINNED_ATTENTION_FILE),
            "cpu-pinned-served": lambda: fit_cpu_pinned_served(docs / SERVED_PROFILE_FILE,
                                                               docs / PINNED_FIT_FILE,
                                                               docs / "bench-roofline.json"),
            "cpu-pinned-kernel": lambda: fit_cpu_pinned_kernel(docs / KERNEL_PROFILE_FILE,
                                                               docs / PINNED_FIT_FILE,
                                                               docs / "bench-roofline.json"),
            "cpu-pinned-prefetch": lambda: fit_cpu_pinned_kernel(
                docs / PREFETCH_PROFILE_FILE, docs / PINNED_FIT_FILE,
                docs / "bench-roofline.json", name="cpu-pinned-prefetch",
                fit_offload_overhead=True),
            "h200": lambda: fit_h200(docs / "gpu-check.json")}
    profiles = json.loads(out.read_text()) if only and out.is_file() else {}
    for name, fit in fits.items():
        if only in (None, name):
            profiles[name] = fit().to_json()
    profiles = {k: profiles[k] for k in fits if k in profiles}
    out.write_text(json.dumps(profiles, indent=2) + "\n")
    return {k: v for k, v in profiles.items() if only in (None, k)}


def validate_all(docs: Path = DOCS) -> dict:
    """The stored profiles against the checking data (printed and returned)."""
    from adrenaline.sim.hardware import load_profiles

    profiles = load_profiles()
    cpu = check_cpu(profiles["cpu"], docs / "bench-offload.json", docs / "bench-serving-sweep.json")
    print("CPU, bench offload (live vs simulated; error):")
    for row in cpu["offload"]["rows"]:
        print(f"  {row['system']:11}" + "".join(
            f"  {k} {v['live']:.1f} vs {v['sim']:.1f} ({v['err']:+.1%})"
            for k, v in row.items() if k != "system"))
    print("CPU, bench serving sweep (live vs simulated; error; live IQR/median):")
    for row in cpu["serving_sweep"]["rows"]:
        print(f"  {row['system']:11} {row['request_rate']:4g}/s" + "".join(
            f"  {k} {v['live']:.0f} vs {v['sim']:.0f} ({v['err']:+.0%}"
            + (f"; spread {v['live_spread']:.0%})" if v["live_spread"] is not None else ")")
            for k, v in row.items() if k not in ("system", "request_rate")))
    checks = {name: check_pinned(profiles[name], docs / file)
              for name, file in PINNED_CHECKS.items()}
    h200 = profiles["h200"].fitted_on
    print(f"H200 decode step: fitted on batches {h200['decode_fit_batches']}, error on the "
          f"others: " + ", ".join(f"{b}: {e:+.1%}" for b, e in h200["check_error"].items()))
    return {"cpu": cpu, "h200": {"check_error": h200["check_error"],
                                 "fit_error": h200["fit_error"]},
            "cpu_fit_error": profiles["cpu"].fitted_on["fit_error"],
            **{name.replace("-", "_"): {
                "file": file, "rows": checks[name],
                **({"fit_error": profiles[name].fitted_on["fit_error"]}
                   if "fit_error" in profiles[name].fitted_on else {})}
               for name, file in PINNED_CHECKS.items()}}


def validate_files(profile: str, files: list[Path]) -> dict:
    """The stored profile ``profile`` against each `bench offload` result of ``files``
    (`sim validate --profile P --check F`): every simulated quantity from the file."""
    from adrenaline.sim.hardware import get_profile

    hw = get_profile(profile)
    return {"profile": profile, "fitted_on": hw.fitted_on,
            "checks": [{"file": str(f), "rows": check_pinned(hw, Path(f))} for f in files]}


def check_pinned(hw: HardwareProfile, file: Path) -> list[dict]:
    """A pinned CPU profile against the `bench offload` result ``file`` (its workload, model
    and layout), printed and returned."""
    rows = check_cpu_pinned(hw, file)
    print(f"{hw.name}, {file.name} (live vs simulated; error):")
    for row in rows:
        print(f"  {row['system']:11}" + "".join(
            f"  {k} {v['live']:.2f} vs {v['sim']:.2f} ({v['err']:+.1%})"
            for k, v in row.items() if k != "system"))
    return rows
