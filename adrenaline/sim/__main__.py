"""``python -m adrenaline.sim {run,sweep,plan,fit,validate,profiles}`` (see docs/SIMULATION.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adrenaline.app_config import CONTROL_SLOTS, LimitsConfig
from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.bench.serving_metrics import Slo
from adrenaline.sim.simulator import SimConfig
from adrenaline.sim.sweep import fmt_rate, parse_layout, plan, sweep
from adrenaline.sim.workload import Workload

COLS = [("output_throughput", "tok/s", 9, 1), ("request_throughput", "req/s", 7, 2),
        ("request_goodput", "good/s", 7, 2), ("ttft_p50_ms", "TTFT50", 8, 0),
        ("ttft_p99_ms", "TTFT99", 8, 0), ("tpot_p50_ms", "TPOT50", 7, 1),
        ("tpot_p99_ms", "TPOT99", 7, 1), ("itl_p99_ms", "ITL99", 7, 1),
        ("offload_ratio", "offl", 5, 2), ("mean_decode_batch", "batch", 7, 1)]


def _common(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("deployment")
    g.add_argument("--model", default="small", help="built-in config name or HF config.json path")
    g.add_argument("--dtype", default=None)
    g.add_argument("--hardware", default="cpu",
                   help="cpu, cpu-pinned(-served, -kernel, -prefetch), h200, h100, a100-80gb")
    g.add_argument("--layout", default="1P1D", help="xPyD (sweep: comma list)")
    g.add_argument("--systems", default="none",
                   help="comma list: none, static@ratio=0.5, load_aware@tpot_slo_ms=100, "
                        "mod:Class@k=v")
    g.add_argument("--prefill-kv-tokens", type=int, default=None)
    g.add_argument("--decode-kv-tokens", type=int, default=None)
    g.add_argument("--executor-kv-tokens", default=None,
                   help="tokens per executor (sweep: comma list); default: half the prefill "
                        "device's free memory")
    g.add_argument("--executor-share", type=float, default=None, help="of the prefill device")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--link-gbs", type=float, default=None, help="KV handoff bandwidth")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="the router's limits (app args `limits`); default: none")
    g.add_argument("--max-queued-requests", type=int, default=None)
    g.add_argument("--prefill-when-admissible", action="store_true",
                   help="the router's limits.prefill_when_admissible: wait before prefill "
                        "until decode could take the request")
    g.add_argument("--profile-batches", default=None,
                   help="what-if: decode batches load_aware's start-up profile times, e.g. "
                        "1,8,64,256 (default: as the live router, powers of 2 up to max-num-seqs)")
    g.add_argument("--exchange-layer-us", type=float, default=None,
                   help="what-if: the offload exchange per layer (default: the profile's)")
    w = ap.add_argument_group("workload (as `bench serving`)")
    w.add_argument("--dataset", default="random",
                   choices=["random", "sharegpt-synthetic", "long-decode", "sharegpt", "trace"])
    w.add_argument("--dataset-path", default=None)
    w.add_argument("--tokenizer", default=None)
    w.add_argument("--num-prompts", type=int, default=1000)
    w.add_argument("--input-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.0)
    w.add_argument("--request-rate", default="inf", help="req/s (sweep: comma list)")
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--seed", type=int, default=0)
    s = ap.add_argument_group("output")
    s.add_argument("--slo-ttft-ms", type=float, default=None)
    s.add_argument("--slo-tpot-ms", type=float, default=None)
    s.add_argument("--slo-e2e-ms", type=float, default=None)
    s.add_argument("--sample-interval", type=float, default=1.0, help="simulated s between samples")
    s.add_argument("--out", default=None, help="JSON result file")
    s.add_argument("--plot-dir", default=None, help="write figures here")


def _config(a) -> SimConfig:
    p, d = parse_layout(a.layout.split(",")[0])
    ekv = a.executor_kv_tokens.split(",")[0] if a.executor_kv_tokens else None
    return SimConfig(model=a.model, dtype=a.dtype, hardware=a.hardware, num_prefill=p,
                     num_decode=d, executor=True, prefill_kv_tokens=a.prefill_kv_tokens,
                     decode_kv_tokens=a.decode_kv_tokens,
                     executor_kv_tokens=int(ekv) if ekv else None,
                     executor_share=a.executor_share, max_num_seqs=a.max_num_seqs,
                     max_num_batched_tokens=a.max_num_batched_tokens, link_gbs=a.link_gbs,
                     limits=_limits(a), prefill_when_admissible=a.prefill_when_admissible,
                     profile_batches=(tuple(int(b) for b in a.profile_batches.split(","))
                                      if a.profile_batches else None),
                     exchange_layer_s=(a.exchange_layer_us * 1e-6
                                       if a.exchange_layer_us is not None else None),
                     sample_interval_s=a.sample_interval)


def _limits(a) -> LimitsConfig | None:
    """The router's admission limits given on the command line (the other one at the
    router's default); None: none."""
    given = {k: v for k, v in (("max_ongoing_requests", a.max_ongoing_requests),
                               ("max_queued_requests", a.max_queued_requests)) if v}
    if not given:
        return None
    default = LimitsConfig()
    ongoing = given.get("max_ongoing_requests", default.max_ongoing_requests)
    return LimitsConfig(**given, max_http_requests=max(default.max_http_requests,
                                                       ongoing + CONTROL_SLOTS))


def _workload(a) -> Workload:
    return Workload(dataset=a.dataset, num_prompts=a.num_prompts, input_len=a.input_len,
                    output_len=a.output_len, range_ratio=a.range_ratio,
                    dataset_path=a.dataset_path, tokenizer=a.tokenizer,
                    request_rate=float(a.request_rate.split(",")[0]), burstiness=a.burstiness,
                    max_concurrency=a.max_concurrency, seed=a.seed)


def _slo(a) -> Slo:
    return Slo(a.slo_ttft_ms, a.slo_tpot_ms, a.slo_e2e_ms)


def _flat(row: dict) -> dict:
    return {"label": f"{row['system']} {row['layout']} @{fmt_rate(row['request_rate'])}",
            **row["metrics"], **{k: row[k] for k in ("offload_ratio", "mean_decode_batch")}}


def _print_rows(rows: list[dict]) -> None:
    width = max([len(_flat(r)["label"]) for r in rows] + [10]) + 1
    print_table([_flat(r) for r in rows], COLS, label=("label", width))


def _finish(a, rows: list[dict], extra: dict | None = None) -> dict:
    result = {**result_header("sim"), "argv": sys.argv[1:], **(extra or {}), "rows": rows}
    if a.out:
        write_result(result, a.out)
    if a.plot_dir:
        from adrenaline.sim.plots import plot_over_time, plot_throughput

        out = Path(a.plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        if len({r["request_rate"] for r in rows}) > 1:
            print("wrote", plot_throughput(rows, out / "sim_throughput.png"))
        print("wrote", plot_over_time(rows[-1], out / "sim_over_time.png"))
    return result


def cmd_run(a) -> dict:
    a.request_rate = a.request_rate.split(",")[0]
    rows = sweep(_config(a), _workload(a), a.systems.split(","), [float(a.request_rate)],
                 [a.layout.split(",")[0]], slo=_slo(a))
    _print_rows(rows)
    for r in rows:
        print(f"{r['system']}: simulated {len(r['samples'])} samples in {r['sim_wall_s']:.2f} s; "
              f"KV budgets {r['kv_budgets_tokens']}; preemptions {r['num_preemptions']}, "
              f"b_max {r['b_max']}, unfinished {r['num_unfinished']}")
    return _finish(a, rows)


def _progress(row: dict) -> None:
    print(f"  {_flat(row)['label']}: {row['metrics']['output_throughput']:.1f} tok/s", flush=True)


def cmd_sweep(a) -> dict:
    ekv = ([int(x) for x in a.executor_kv_tokens.split(",")] if a.executor_kv_tokens else None)
    rows = sweep(_config(a), _workload(a), a.systems.split(","),
                 [float(x) for x in a.request_rate.split(",")], a.layout.split(","), ekv,
                 slo=_slo(a), progress=_progress)
    _print_rows(rows)
    return _finish(a, rows)


def cmd_plan(a) -> dict:
    slo = _slo(a)
    if slo.empty:
        raise SystemExit("plan needs an SLO (--slo-ttft-ms / --slo-tpot-ms / --slo-e2e-ms)")
    result = plan(_config(a), _workload(a), a.num_gpus, a.systems.split(","), slo,
                  [float(x) for x in a.request_rate.split(",")])
    _print_rows(result["rows"])
    b = result["best"]
    print(f"\nbest under the SLO: {b['system']} on {b['layout']} at {fmt_rate(b['request_rate'])} "
          f"req/s: goodput {result['best_metrics']['request_goodput']:.2f} req/s")
    print("app args (serve run YAML `args:`):")
    print(json.dumps(result["app_args"], indent=2))
    return _finish(a, result["rows"], {"best": b, "app_args": result["app_args"]})


def cmd_fit(a) -> dict:
    from adrenaline.sim.fit import fit_all

    profiles = fit_all(iters=a.iters, only=a.only)
    for name, p in profiles.items():
        print(name, json.dumps(p["fitted_on"], indent=1))
    return profiles


def cmd_validate(a) -> dict:
    from adrenaline.sim.fit import validate_all, validate_files

    if a.check:
        result = validate_files(a.profile or "cpu-pinned-kernel", [Path(f) for f in a.check])
    elif a.profile:
        raise SystemExit("validate --profile: name the run(s) to check it on with --check")
    else:
        result = validate_all()
    if a.out:
        write_result(result, a.out)
    return result


def cmd_paper(a) -> dict:
    from adrenaline.sim import paper

    rates = tuple(float(r) for r in a.rates.split(",")) if a.rates else paper.RATES
    result = {**result_header("sim-paper"), **paper.run(a.num_prompts, a.tpot_slo_ms,
                                                         dataset=a.dataset, rates=rates)}
    for case in result["slo"]:
        b = case["best"]
        fmt = lambda r: (f"{r['output_throughput']:.0f} tok/s at {r['request_rate']:g} req/s"
                         if r else "SLO never met")
        print(f"{case['model']} {case['layout']}: " + ", ".join(
            f"{k} {fmt(v)}" for k, v in b.items()) + "; gain vs none " + ", ".join(
            f"{k} {g:.2f}" if g else f"{k} -" for k, g in case["gain"].items()))
    if a.out:
        write_result(result, a.out)
    if a.plot_dir:
        Path(a.plot_dir).mkdir(parents=True, exist_ok=True)
        for p in paper.plot(result, Path(a.plot_dir)):
            print("wrote", p)
    return result


def cmd_profiles(a) -> dict:
    from adrenaline.sim.hardware import load_profiles
    from adrenaline.sim.models import CONFIGS

    profiles = load_profiles()
    for name, p in profiles.items():
        print(f"{name:17} {p.mem_bw_gbs:8.1f} GB/s {p.flops_tflops:8.2f} TFLOP/s  "
              f"{json.dumps(p.fitted_on)[:100]}")
    print("models:", ", ".join(CONFIGS), "(or a path to an HF config.json)")
    return {k: p.to_json() for k, p in profiles.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.sim", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("run", cmd_run, "one configuration"),
                               ("sweep", cmd_sweep, "every layout x system x rate x executor KV"),
                               ("plan", cmd_plan, "best xPyD split of N GPUs under an SLO")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.set_defaults(fn=fn)
        if name == "plan":
            p.add_argument("--num-gpus", type=int, required=True)
    p = sub.add_parser("fit", help="refit the cpu, cpu-pinned(-served, -kernel, -prefetch) "
                                   "and h200 profiles (writes sim/profiles.json)")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--only", default=None,
                   choices=["cpu", "cpu-pinned", "cpu-pinned-served", "cpu-pinned-kernel",
                            "cpu-pinned-prefetch", "h200"],
                   help="refit this profile alone (the others stay as stored)")
    p.set_defaults(fn=cmd_fit)
    p = sub.add_parser("validate", help="simulated vs live, on data the fit did not use")
    p.add_argument("--check", action="append", default=None, metavar="FILE",
                   help="a `bench offload` result to check --profile on instead (repeatable); "
                        "its workload, model and layout come from the file")
    p.add_argument("--profile", default=None,
                   help="the stored profile --check uses (default: cpu-pinned-kernel)")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("paper", help="the paper's setting: Llama-2 7B/13B, A100, 1P1D and 2P2D")
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--dataset", default="sharegpt-synthetic",
                   choices=["sharegpt-synthetic", "long-decode"])
    p.add_argument("--rates", default=None, help="per prefill instance, comma-separated")
    p.add_argument("--out", default=None)
    p.add_argument("--plot-dir", default=None)
    p.set_defaults(fn=cmd_paper)
    p = sub.add_parser("profiles", help="list hardware profiles and models")
    p.set_defaults(fn=cmd_profiles)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
