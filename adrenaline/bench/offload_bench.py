"""Offloading benchmark: none vs static vs load_aware on a KV-capacity-bound workload.

One prefill, one decode instance and the prefill's attention executor on
this machine's cores (1 torch thread each). The decode KV budget is small
enough to cap the decode batch; the executor's budget stands for the
prefill GPU's idle memory. Every request is sent at once through the handle
client; token arrival times give TTFT and TPOT. Worker metrics give the
mean decode batch, the per-layer round trip to the executor and its share of
the decode step, and the prefill side's KV capacity and bandwidth use.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.bench.serving_metrics import RequestTimeline, summarize
from adrenaline.bench.serving_sweep import ADRENALINE_SYSTEMS
from adrenaline.bench.workloads import random_token_prompts

SYSTEMS = ADRENALINE_SYSTEMS  # the serving sweep's policies and options


async def _one(client, prompt, params) -> RequestTimeline:
    timing = RequestTimeline(start=time.perf_counter())
    seen = 0
    async for out in client.stream(prompt, params):
        now = time.perf_counter()
        timing.token_times.extend([now] * (len(out.token_ids) - seen))
        seen = len(out.token_ids)
    return timing


async def _sample_usage(client, stop: asyncio.Event, samples: list) -> None:
    while not stop.is_set():
        samples.append(await client.metrics())
        await asyncio.sleep(0.5)


async def _run(client, prompts, params):
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(_sample_usage(client, stop, samples))
    start = time.perf_counter()
    timings = await asyncio.gather(*[_one(client, p, params) for p in prompts])
    elapsed = time.perf_counter() - start
    stop.set()
    await sampler
    return timings, elapsed, samples, await client.metrics()


def bench_system(name: str, args, prompts) -> dict:
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.sampling_params import SamplingParams
    from adrenaline.serve.app import build_router_app

    policy, options = SYSTEMS[name]
    engine = {"num_threads": 1, "max_num_seqs": len(prompts)}
    app_args = {
        "model": args.model, "dtype": args.dtype, "policy": policy, "policy_options": options,
        "prefill": {"engine": {**engine, "kv_cache_tokens": args.prefill_kv_tokens}},
        "decode": {"engine": {**engine, "kv_cache_tokens": args.decode_kv_tokens,
                              "num_threads": args.decode_threads}},
        "executor": {"enabled": name != "none",
                     "engine": {"num_threads": 1, "kv_cache_tokens": args.executor_kv_tokens}},
    }
    app = f"offload-{name}"
    serve.run(build_router_app(app_args), name=app, route_prefix=None)
    try:
        client = Client(app_name=app)
        params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        asyncio.run(_run(client, prompts[:2], SamplingParams(max_tokens=4, temperature=0)))
        before = asyncio.run(client.metrics())
        router = serve.get_deployment_handle("Router", app_name=app)
        stats0 = router.stats.remote().result()
        timings, elapsed, samples, after = asyncio.run(_run(client, prompts, params))
        stats = router.stats.remote().result()
    finally:
        serve.delete(app)
    row = {"system": name, **summarize(timings, elapsed)}
    row.update(_worker_stats(before, after, samples, elapsed))
    row["offload_ratio"] = ((stats["num_offloaded"] - stats0["num_offloaded"])
                            / max(stats["num_placed"] - stats0["num_placed"], 1))
    row["b_max"], row["ob_mem"] = stats["b_max"], stats["ob_mem"]
    return row


def _delta(before, after, role: str, field: str) -> float:
    b = sum(getattr(m, field) for m in before if m.role == role)
    a = sum(getattr(m, field) for m in after if m.role == role)
    return a - b


def _worker_stats(before, after, samples, elapsed) -> dict:
    steps = _delta(before, after, "decode", "num_steps")
    out = {"mean_decode_batch": _delta(before, after, "decode", "batch_size_sum") / max(steps, 1),
           "decode_step_ms": 1e3 * _delta(before, after, "decode", "step_time_s") / max(steps, 1)}
    waits = _delta(before, after, "decode", "num_remote_waits")
    if waits:
        wait_s = _delta(before, after, "decode", "remote_wait_s")
        out["remote_wait_per_layer_ms"] = 1e3 * wait_s / waits
        out["remote_wait_share_of_step"] = wait_s / max(_delta(before, after, "decode",
                                                               "step_time_s"), 1e-9)
    # Prefill side = the prefill worker's pool plus its executor's (the idle GPU memory).
    side = [[m for m in s if m.role in ("prefill", "executor")] for s in samples]
    used = [sum(m.kv_blocks_used for m in s) / max(sum(m.kv_blocks_total for m in s), 1)
            for s in side if s]
    out["prefill_side_kv_use_mean"] = sum(used) / max(len(used), 1)
    out["prefill_side_kv_use_max"] = max(used, default=0.0)
    out["executor_attention_gbs"] = _delta(before, after, "executor", "kv_bytes_read") / elapsed / 1e9
    out["executor_busy_share"] = _delta(before, after, "executor", "busy_s") / elapsed
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench offload")
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--decode-kv-tokens", type=int, default=1536, help="caps the decode batch")
    ap.add_argument("--prefill-kv-tokens", type=int, default=8192)
    ap.add_argument("--executor-kv-tokens", type=int, default=8192)
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="torch threads of the decode worker (prefill and executor get 1)")
    ap.add_argument("--systems", default="none,static,load_aware")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.hf_config import load_model_config

    vocab = load_model_config(resolve_model_dir(args.model)).vocab_size
    prompts = random_token_prompts(args.num_requests, args.input_len, vocab, args.seed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8765})
        rows = [bench_system(name, args, prompts) for name in args.systems.split(",")]
    finally:
        serve.shutdown()
        ray.shutdown()
    base = next((r["output_tok_s"] for r in rows if r["system"] == "none"), None)
    for r in rows:
        r["vs_none"] = r["output_tok_s"] / base if base else None
    result = {**result_header("offload"), "model": args.model, "dtype": args.dtype,
              "workload": {k: getattr(args, k) for k in ("num_requests", "input_len", "output_len",
                                                         "decode_kv_tokens", "prefill_kv_tokens",
                                                         "executor_kv_tokens", "decode_threads",
                                                         "seed")},
              "rows": rows}
    _print(result)
    write_result(result, args.out)
    return result


def _print(result: dict) -> None:
    w = result["workload"]
    print(f"\noffload benchmark: {result['model']} {result['dtype']}, {w['num_requests']} x "
          f"({w['input_len']} -> {w['output_len']}), decode KV {w['decode_kv_tokens']} tokens, "
          f"executor KV {w['executor_kv_tokens']} tokens")
    # (key, header, width, decimals)
    cols = [("output_tok_s", "tok/s", 8, 1), ("vs_none", "x none", 7, 2),
            ("tpot_p50_ms", "TPOT50", 7, 1), ("tpot_p99_ms", "TPOT99", 7, 1),
            ("ttft_p50_ms", "TTFT50", 7, 0), ("ttft_p99_ms", "TTFT99", 7, 0),
            ("mean_decode_batch", "batch", 6, 1), ("offload_ratio", "offl", 5, 2),
            ("remote_wait_per_layer_ms", "rt/lyr", 7, 2),
            ("remote_wait_share_of_step", "rt%step", 8, 2),
            ("prefill_side_kv_use_max", "pKVmax", 7, 2), ("executor_attention_gbs", "exGB/s", 7, 2)]
    print_table(result["rows"], cols)
