"""Served system vs offline engine on one workload: what disaggregation and Serve cost.

Starts the Serve app in this process's Ray cluster (1 prefill + 1 decode by
default), sends every request at once over HTTP with streaming to
/v1/completions (token-id prompts, greedy, ignore_eos), and records each
token's arrival. The offline row runs the same requests through one
EngineCore with the same total thread budget, stamping tokens as steps
finish. Prints a table, writes JSON with one row per system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.bench.serving_metrics import RequestTimeline, summarize
from adrenaline.bench.workloads import random_token_prompts

PORT = 8000


async def _stream_one(client, model: str, prompt: list[int], output_len: int
                      ) -> RequestTimeline:
    timing = RequestTimeline(start=time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.num_output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                # One chunk may stand for several tokens (text held back at a partial
                # UTF-8 sequence); usage gives the exact count for TPOT.
                timing.token_times.append(time.perf_counter())
    return timing


async def _run_http(model: str, prompts: list[list[int]], output_len: int) -> tuple[list, float]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        timings = await asyncio.gather(*[_stream_one(client, model, p, output_len) for p in prompts])
        return timings, time.perf_counter() - start


def bench_served(args, prompts: list[list[int]]) -> dict:
    import ray
    from ray import serve

    from adrenaline.serve.app import build_app

    engine = {"kv_cache_tokens": args.kv_cache_tokens, "num_threads": 1,
              "max_num_seqs": len(prompts)}
    app_args = {"model": args.model, "dtype": args.dtype,
                "prefill": {"num_instances": 1, "engine": engine},
                "decode": {"num_instances": 1, "engine": engine}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(app_args), name="bench", route_prefix="/")
        asyncio.run(_run_http(args.model, prompts[:2], 4))  # warm-up
        timings, elapsed = asyncio.run(_run_http(args.model, prompts, args.output_len))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"system": "adrenaline served (1P1D, HTTP stream)", **summarize(timings, elapsed)}


def bench_offline(args, prompts: list[list[int]]) -> dict:
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore
    from adrenaline.sampling_params import SamplingParams

    engine = EngineCore(args.model, dtype=args.dtype, config=EngineConfig(
        kv_cache_tokens=2 * args.kv_cache_tokens, num_threads=2, max_num_seqs=len(prompts)))
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    def run(batch: list[list[int]], tag: str) -> tuple[list[RequestTimeline], float]:
        start = time.perf_counter()
        timings = {}
        for i, p in enumerate(batch):
            engine.add_request(f"{tag}{i}", p, params)
            timings[f"{tag}{i}"] = RequestTimeline(start=start)
        while engine.has_unfinished:
            stepped = engine.step()
            now = time.perf_counter()
            for r in stepped:
                timings[r.request_id].token_times.append(now)
        return list(timings.values()), time.perf_counter() - start

    run(prompts[:2], "warm")
    timings, elapsed = run(prompts, "r")
    return {"system": "adrenaline offline (1 engine)", **summarize(timings, elapsed)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench serve")
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--kv-cache-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.hf_config import load_model_config

    vocab = load_model_config(resolve_model_dir(args.model)).vocab_size
    prompts = random_token_prompts(args.num_requests, args.input_len, vocab, args.seed)
    rows = [bench_offline(args, prompts), bench_served(args, prompts)]
    result = {**result_header("serve"), "torch_threads_total": 2, "model": args.model,
              "dtype": args.dtype, "workload": {"num_requests": args.num_requests,
                                                "input_len": args.input_len,
                                                "output_len": args.output_len, "seed": args.seed},
              "rows": rows}
    print(f"\nserve benchmark: {args.model} {args.dtype}, {args.num_requests} x "
          f"({args.input_len} -> {args.output_len}), all at once")
    print_table(rows, [("output_tok_s", "tok/s", 9, 1), ("ttft_p50_ms", "TTFT p50", 10, 0),
                       ("ttft_p99_ms", "TTFT p99", 10, 0), ("tpot_p50_ms", "TPOT p50", 10, 1),
                       ("tpot_p99_ms", "TPOT p99", 10, 1)], label=("system", 40))
    write_result(result, args.out)
    return result
