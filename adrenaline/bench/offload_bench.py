"""Offloading benchmark: none vs static vs load_aware on one prefill (+ executor) and one decode.

Each system is deployed in turn (the same requests, the same cores) and run at each
``--rates`` rate: Poisson arrivals, or every request at once (``inf``). Requests go
through the handle client, so each one's greedy token ids are compared with the
offline engine's (``--check-greedy``). Token arrival times give TTFT and TPOT, output
tok/s over the run and while saturated (from the last arrival to the last first token:
no ramp, no drain), and the tokens of each 10 s;
worker metrics give the mean decode batch (over the run, and in the saturated window
with its step, offloaded requests and wait), the offload ratio, the per-layer wait
on the executor and its share of the decode step, the prefill side's core
utilization (prefill steps + executor attention over the run) and the executor's
attention bandwidth; the start-up profile gives the attention share of the
decode step at the run's mean batch and context.

Datasets: ``fixed`` (``--input-len`` -> ``--output-len`` each), ``long-decode`` and
``sharegpt-synthetic`` (bench/serving_workloads.py). ``--pin``: the prefill instance
and its executor on core 0, decode on core 1 (serve_configs/local.yaml's layout).
``--nice N``: those workers at niceness N.
``--prefill-when-admissible``: the router's prefill gate (``limits.prefill_when_admissible``:
a request waits before prefill until decode could take it); each row records it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

from adrenaline.bench.offload_report import print_rows, saturated_worker_stats, worker_stats
from adrenaline.bench.report import result_header, write_result
from adrenaline.bench.serving_metrics import (RequestTimeline, saturated_throughput, summarize,
                                             tokens_by_interval)
from adrenaline.bench.serving_workloads import (SampleRequest, arrival_offsets,
                                               long_decode_requests, synthetic_sharegpt_requests)
from adrenaline.bench.workloads import random_token_prompts

SYSTEMS = ("none", "static", "load_aware")


async def _one(client, prompt, params, delay: float) -> tuple[RequestTimeline, list[int]]:
    await asyncio.sleep(delay)
    timing = RequestTimeline(start=time.perf_counter(), prompt_tokens=len(prompt))
    tokens: list[int] = []
    async for out in client.stream(prompt, params):
        now = time.perf_counter()
        timing.token_times.extend([now] * (len(out.token_ids) - len(tokens)))
        tokens = list(out.token_ids)
    timing.end = time.perf_counter()
    return timing, tokens


async def _sample_usage(client, stop: asyncio.Event, samples: list) -> None:
    """(perf_counter, worker metrics) every 0.5 s."""
    while not stop.is_set():
        metrics = await client.metrics()
        samples.append((time.perf_counter(), metrics))
        await asyncio.sleep(0.5)


async def _run(client, prompts, params, offsets):
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(_sample_usage(client, stop, samples))
    start = time.perf_counter()
    done = await asyncio.gather(*[_one(client, p, sp, o)
                                  for p, sp, o in zip(prompts, params, offsets)])
    elapsed = time.perf_counter() - start
    stop.set()
    await sampler
    return [t for t, _ in done], [k for _, k in done], elapsed, samples


def app_args(args, name: str) -> dict:
    options = {"none": {}, "static": {"ratio": args.static_ratio},
               "load_aware": {"tpot_slo_ms": args.tpot_slo_ms,
                              "step_feedback": args.step_feedback,
                              "hide_remote": args.hide_remote}}[name]
    engine = {"num_threads": 1, "max_num_seqs": args.max_num_seqs, "block_size": args.block_size}
    pin = (lambda core: {"cpus": [core]}) if args.pin else (lambda core: {})
    nice = {} if args.nice is None else {"nice": args.nice}
    return {
        "model": args.model, "dtype": args.dtype, "policy": name, "policy_options": options,
        "prefill": {**pin(0), **nice,
                    "engine": {**engine, "kv_cache_tokens": args.prefill_kv_tokens}},
        "decode": {**pin(1), **nice,
                   "engine": {**engine, "kv_cache_tokens": args.decode_kv_tokens,
                              "num_threads": args.decode_threads}},
        "executor": {"enabled": name != "none", "pace_layers": args.pace_layers,
                     "engine": {"num_threads": 1, "kv_cache_tokens": args.executor_kv_tokens,
                                "block_size": args.block_size}},
        "limits": {"prefill_when_admissible": args.prefill_when_admissible},
    }


def bench_system(name: str, args, prompts, params, rates, expected) -> list[dict]:
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.sampling_params import SamplingParams
    from adrenaline.serve.app import build_router_app

    app = f"offload-{name}"
    serve.run(build_router_app(app_args(args, name)), name=app, route_prefix=None)
    rows = []
    try:
        client = Client(app_name=app)
        router = serve.get_deployment_handle("Router", app_name=app)
        warm = [SamplingParams(max_tokens=4, temperature=0)] * 2
        asyncio.run(_run(client, prompts[:2], warm, [0.0, 0.0]))
        for rate in rates:
            offsets = arrival_offsets(len(prompts), rate, 1.0, args.seed)
            before, stats0 = asyncio.run(client.metrics()), router.stats.remote().result()
            timings, tokens, elapsed, samples = asyncio.run(_run(client, prompts, params, offsets))
            after, stats = asyncio.run(client.metrics()), router.stats.remote().result()
            row = {"system": name, "rate": rate,
                   "prefill_when_admissible": args.prefill_when_admissible,
                   **summarize(timings, elapsed), **saturated_throughput(timings),
                   "output_tokens_by_10s": tokens_by_interval(timings, 10.0)}
            row.update(worker_stats(before, after, [m for _, m in samples], elapsed,
                                    stats.get("profile")))
            if "saturated_window_s" in row:
                # the window's origin as saturated_throughput takes it: the first answered start
                origin = min(t.start for t in timings if t.success and t.token_times)
                row.update(saturated_worker_stats(
                    samples, [origin + w for w in row["saturated_window_s"]]))
            placed = stats["num_placed"] - stats0["num_placed"]
            row["offload_ratio"] = (stats["num_offloaded"] - stats0["num_offloaded"]) / max(placed, 1)
            row["b_max"], row["ob_mem"] = stats["b_max"], stats["ob_mem"]
            row["links"] = stats.get("links")
            row["profile"] = stats.get("profile")  # the start-up profile (load_aware's)
            if expected is not None:
                row["greedy_mismatches"] = sum(a != b for a, b in zip(tokens, expected))
                # where each differing request first departs from the offline tokens
                row["greedy_divergence"] = {i: _first_difference(a, b) for i, (a, b)
                                            in enumerate(zip(tokens, expected)) if a != b}
            rows.append(row)
            print(f"{name} @ {rate:g} req/s: {row['output_tok_s']:.1f} tok/s, batch "
                  f"{row['mean_decode_batch']:.1f}, offload {row['offload_ratio']:.2f}", flush=True)
    finally:
        serve.delete(app)
    return rows


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def build_prompts(args, model_dir: str, vocab: int) -> list:
    if args.dataset == "fixed":
        return [SampleRequest(p, len(p), args.output_len) for p in
                random_token_prompts(args.num_requests, args.input_len, vocab, args.seed)]
    if args.dataset == "sharegpt-synthetic":
        return synthetic_sharegpt_requests(args.num_requests, vocab, args.input_len,
                                           args.output_len, args.seed)
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    return long_decode_requests(args.num_requests, vocab, args.seed,
                                lambda text: tok.encode(text, add_special_tokens=False))


def offline_tokens(args, prompts, params) -> list[list[int]]:
    """The offline engine's greedy tokens for the same requests (the reference), kept in
    ``--reference`` (reused when it holds these very requests)."""
    import json
    import os

    key = {"model": args.model, "dtype": args.dtype, "attention": _attention_backend(args),
           "prompts": prompts, "max_tokens": [sp.max_tokens for sp in params]}
    if args.reference and os.path.exists(args.reference):
        with open(args.reference) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["tokens"]
    tokens = _offline_run(args, prompts, params)
    if args.reference:
        with open(args.reference, "w") as f:
            json.dump({"key": key, "tokens": tokens}, f)
    return tokens


def _attention_backend(args) -> str:
    """The CPU attention backend every role and the offline engine run (tokens depend on it)."""
    import torch

    from adrenaline.kernels import resolve_attention_backend
    from adrenaline.model.hf_config import load_model_config
    from adrenaline.model.loader import resolve_dtype
    from adrenaline.model.resolve import resolve_model_dir

    mc = load_model_config(resolve_model_dir(args.model))
    cpu = torch.device("cpu")
    return resolve_attention_backend("auto", cpu, mc.num_attention_heads, mc.num_key_value_heads,
                                     mc.head_dim, resolve_dtype(args.dtype, mc, cpu))


def _offline_run(args, prompts, params) -> list[list[int]]:
    from adrenaline import LLM

    # A pool that holds every request at once: no preemption (recompute) slows the reference.
    tokens = sum(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    # One thread: with other processes on the cores, two OpenMP threads spin at barriers.
    llm = LLM(args.model, dtype=args.dtype, num_threads=1, enable_prefix_caching=False,
              kv_cache_tokens=tokens + 64 * len(prompts), max_num_seqs=len(prompts))
    return [list(o.token_ids) for o in llm.generate(prompts, params)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench offload")
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dataset", default="fixed", choices=["fixed", "long-decode",
                                                           "sharegpt-synthetic"])
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=128, help="fixed: each; synthetic: median")
    ap.add_argument("--output-len", type=int, default=64, help="fixed: each; synthetic: median")
    ap.add_argument("--rates", default="inf", help="req/s, comma-separated; inf: all at once")
    ap.add_argument("--decode-kv-tokens", type=int, default=1536, help="caps the decode batch")
    ap.add_argument("--prefill-kv-tokens", type=int, default=8192)
    ap.add_argument("--executor-kv-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16,
                    help="KV block tokens of every role (CPU attention reads larger blocks "
                         "faster: 64 against 16 cut it by about 25%% here)")
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="torch threads of the decode worker (prefill and executor get 1)")
    ap.add_argument("--pin", action="store_true",
                    help="prefill + executor on core 0, decode on core 1")
    ap.add_argument("--nice", type=int, default=None,
                    help="niceness of the prefill, executor and decode workers (e.g. -5: "
                         "ahead of the serving processes on their cores)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--prefill-when-admissible", action="store_true",
                    help="the router's prefill gate: a request waits before prefill (in "
                         "TTFT) until decode could take it, instead of parking after its "
                         "first token (in TPOT)")
    ap.add_argument("--static-ratio", type=float, default=0.75)
    ap.add_argument("--tpot-slo-ms", type=float, default=250.0)
    ap.add_argument("--no-step-feedback", dest="step_feedback", action="store_false",
                    help="load_aware: B_max by the start-up profile's step model alone")
    ap.add_argument("--no-hide-remote", dest="hide_remote", action="store_false",
                    help="load_aware: offload for KV capacity within the bound even where "
                         "the step then waits on the executor")
    ap.add_argument("--no-pace-layers", dest="pace_layers", action="store_false",
                    help="the executor polls the whole gap between a step's layers "
                         "instead of napping through most of it")
    ap.add_argument("--check-greedy", action="store_true",
                    help="compare every request's tokens with the offline engine's")
    ap.add_argument("--reference", default=None,
                    help="file that keeps the offline engine's tokens between runs")
    ap.add_argument("--plot-dir", default=None, help="throughput and TPOT p90 by rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.hf_config import load_model_config
    from adrenaline.sampling_params import SamplingParams

    model_dir = str(resolve_model_dir(args.model))
    reqs = build_prompts(args, model_dir, load_model_config(model_dir).vocab_size)
    prompts = [list(r.prompt) for r in reqs]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
              for r in reqs]
    rates = [math.inf if r == "inf" else float(r) for r in args.rates.split(",")]
    expected = offline_tokens(args, prompts, params) if args.check_greedy else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8765})
        rows = []
        for name in args.systems.split(","):
            rows += bench_system(name, args, prompts, params, rates, expected)
            write_result({"partial": True, "rows": rows}, args.out)  # survives a later stop
    finally:
        serve.shutdown()
        ray.shutdown()
    mean_context = (sum(len(p) for p in prompts) / len(prompts)
                    + sum(p.max_tokens for p in params) / len(params) / 2)
    for r in rows:
        if r.get("profile_attention_us_per_token") and r["decode_step_ms"]:
            # by the start-up profile: local requests x mean context x attention per token
            r["attention_share_of_step"] = (1e-3 * r["profile_attention_us_per_token"]
                                            * r["mean_local_requests"] * mean_context
                                            / r["decode_step_ms"])
        none = next((b for b in rows if b["system"] == "none" and b["rate"] == r["rate"]), {})
        base, sat = none.get("output_tok_s"), none.get("saturated_output_tok_s")
        r["vs_none"] = r["output_tok_s"] / base if base else None
        if sat and r.get("saturated_output_tok_s"):
            r["saturated_vs_none"] = r["saturated_output_tok_s"] / sat
    workload = {k: getattr(args, k) for k in (
        "dataset", "num_requests", "input_len", "output_len", "decode_kv_tokens", "block_size",
        "prefill_kv_tokens", "executor_kv_tokens", "decode_threads", "pin", "static_ratio",
        "tpot_slo_ms", "step_feedback", "hide_remote", "pace_layers", "prefill_when_admissible",
        "nice", "seed")}
    workload.update(mean_prompt_len=sum(len(p) for p in prompts) / len(prompts),
                    mean_output_len=sum(p.max_tokens for p in params) / len(params))
    result = {**result_header("offload"), "model": args.model, "dtype": args.dtype,
              "workload": workload, "rates": [str(r) for r in rates], "rows": rows}
    print_rows(result)
    write_result(result, args.out)
    if args.plot_dir:
        from adrenaline.bench.plots import plot_offload_rates

        for path in plot_offload_rates(result, args.plot_dir):
            print(f"wrote {path}")
    return result
