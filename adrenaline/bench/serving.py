"""Online serving benchmark over HTTP, after vLLM's ``benchmark_serving``.

``python -m adrenaline.bench serving --base-url http://127.0.0.1:8000 --model tiny
--num-prompts 64 --request-rate 4 --out result.json``

Streams every request to ``/v1/completions`` (``ignore_eos`` so outputs have exactly the
requested length; ``stream_options.include_usage`` so the token counts are exact), paced by
``serving_workloads.arrival_offsets`` and capped by ``--max-concurrency``. Each request's
timeline (start, arrival of every token chunk, end of stream) feeds
``serving_metrics.compute_metrics``. The benchmark's duration runs from the first send to the
last request's end. Meanwhile ``metrics_sampler`` scrapes the server's ``/metrics`` every
``--sample-interval`` s (offload ratio, KV use per instance, executor attention bandwidth);
the samples go into the JSON row.

Multi-turn (``--dataset multi-turn``, or ``sharegpt-multi-turn`` with ``--dataset-path``):
``--num-conversations`` conversations of ``--turns`` turns each, started at ``--request-rate``
conversations/s, turns ``--turn-gap-s`` apart (``serving_workloads.multi_turn_schedule``).
``--prefix-compare`` runs it against three apps in turn, ``--num-prefill`` prefill + 1 decode
instances: prefix caching off, on with the current placement, and on with placement by prefix
(``PREFIX_SYSTEMS``), same requests and send times; each row has the prefix cache hit rate
in tokens (from /metrics before and after the run).

Sweep mode (``--sweep-rates 0.5,1,2 --systems none,static,load_aware,vllm``) starts each system
itself (``serving_sweep.py``: adrenaline apps in this process's Ray cluster, vLLM CPU's OpenAI
server from its own venv), one after another, and runs the same requests at every rate; with
matplotlib installed it also draws the figures of ``plots.py`` (``--plot-dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import socket
import sys
import time

from adrenaline.bench.metrics_sampler import add_bandwidth, prefix_hit_rate, sample_metrics, scrape
from adrenaline.bench.report import result_header, write_result
from adrenaline.bench.serving_metrics import RequestTimeline, ServingMetrics, Slo, compute_metrics
from adrenaline.bench.serving_sweep import (ADRENALINE_SYSTEMS, VLLM_SYSTEM, Endpoint, Launcher,
                                            adrenaline_system, ray_serve, run_sweep, sweep_table)
from adrenaline.bench.serving_workloads import (DatasetError, SampleRequest, arrival_offsets,
                                               history_fraction, multi_turn_conversations,
                                               multi_turn_schedule, random_requests,
                                               sharegpt_multi_turn, sharegpt_requests,
                                               long_decode_requests, synthetic_sharegpt_requests)

# Prefix-compare mode: the same app three ways (policy least_loaded, no executor).
PREFIX_SYSTEMS: dict[str, tuple[bool, bool]] = {  # name -> (prefix caching, placement by prefix)
    "cache_off": (False, False),
    "cache_on": (True, False),
    "cache_prefix": (True, True),
}


def sweep_app_args(args, system: str) -> dict:
    """A KV-capacity-bound 1P1D layout: the decode budget caps its batch; the
    executor's budget stands for the prefill GPU's idle memory."""
    policy, options = ADRENALINE_SYSTEMS[system]
    engine = {"num_threads": 1}
    return {"model": args.model, "dtype": args.dtype, "policy": policy,
            "policy_options": options,
            "prefill": {"engine": {**engine, "kv_cache_tokens": args.prefill_kv_tokens}},
            "decode": {"engine": {**engine, "kv_cache_tokens": args.decode_kv_tokens}},
            "executor": {"enabled": system != "none",
                         "engine": {**engine, "kv_cache_tokens": args.executor_kv_tokens}}}


class _Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, disable: bool = False):
        self.total, self.n, self._bar = total, 0, None
        self.disable = disable
        if disable:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="requests", file=sys.stderr)
        except ImportError:
            pass

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif not self.disable:
            print(f"\r{self.n}/{self.total} requests", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.disable:
            print(file=sys.stderr)


async def send_request(client, url: str, model: str, req: SampleRequest) -> RequestTimeline:
    """Stream one completion; any HTTP or protocol error makes a failed timeline."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t = RequestTimeline(start=time.perf_counter(), prompt_tokens=req.prompt_len)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                t.success, t.error = False, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return t
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    t.num_output_tokens = chunk["usage"]["completion_tokens"]
                    t.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("error"):
                    t.success, t.error = False, str(chunk["error"])[:200]
                for c in chunk.get("choices") or []:
                    # A chunk with text marks token arrival(s); a text-less finish chunk
                    # only counts when nothing arrived before it.
                    if c.get("text") or (c.get("finish_reason") and not t.token_times):
                        t.token_times.append(now)
        t.end = time.perf_counter()
        if not t.token_times:
            t.success, t.error = False, t.error or "no token chunk received"
    except Exception as e:  # noqa: BLE001 - one failed request must not end the benchmark
        t.success, t.error = False, f"{type(e).__name__}: {e}"[:200]
    return t


async def run_benchmark(base_url: str, model: str, requests: list[SampleRequest],
                        request_rate: float = math.inf, burstiness: float = 1.0,
                        max_concurrency: int | None = None, seed: int = 0,
                        progress: bool = True, offsets: list[float] | None = None
                        ) -> tuple[list[RequestTimeline], float]:
    """Send ``requests`` on the arrival schedule (``offsets`` when given, else paced by
    ``request_rate``); (timelines in request order, duration s)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    if offsets is None:
        offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = _Progress(len(requests), disable=not progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: SampleRequest, offset: float) -> RequestTimeline:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            if sem is None:
                t = await send_request(client, url, model, req)
            else:
                async with sem:
                    t = await send_request(client, url, model, req)
            bar.update()
            return t

        timelines = await asyncio.gather(*[one(r, o) for r, o in zip(requests, offsets)])
        duration = time.perf_counter() - t0
    bar.close()
    return list(timelines), duration


def build_workload(args) -> tuple[list[SampleRequest], list[float] | None]:
    """(requests, send offsets): multi-turn datasets fix the offsets; the others get None
    (paced by --request-rate)."""
    if args.dataset == "multi-turn":
        vocab = args.vocab_size or _vocab_size(args.tokenizer or args.model)
        convs = multi_turn_conversations(args.num_conversations, args.turns, vocab,
                                         args.system_len, args.user_len, args.answer_len,
                                         args.output_len, args.seed)
    elif args.dataset == "sharegpt-multi-turn":
        if not args.dataset_path:
            raise SystemExit("--dataset sharegpt-multi-turn needs --dataset-path")
        try:
            convs = sharegpt_multi_turn(args.dataset_path, args.num_conversations, args.turns,
                                        _encoder(args), seed=args.seed)
        except DatasetError as e:
            raise SystemExit(str(e)) from None
    else:
        return build_requests(args), None
    return multi_turn_schedule(convs, args.request_rate, args.turn_gap_s, args.burstiness,
                               args.seed)


def build_requests(args) -> list[SampleRequest]:
    """The dataset named by ``--dataset``; token-id prompts need the model's vocab size."""
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset sharegpt needs --dataset-path")
        try:
            return sharegpt_requests(args.dataset_path, args.num_prompts, _encoder(args),
                                     fixed_output_len=args.sharegpt_output_len, seed=args.seed)
        except DatasetError as e:
            raise SystemExit(str(e)) from None
    vocab = args.vocab_size or _vocab_size(args.tokenizer or args.model)
    if args.dataset == "long-decode":
        return long_decode_requests(args.num_prompts, vocab, args.seed, _encoder(args))
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.input_len, args.output_len, vocab,
                               args.range_ratio, args.seed)
    return synthetic_sharegpt_requests(args.num_prompts, vocab, args.input_len, args.output_len,
                                       args.seed)


def _vocab_size(model: str) -> int:
    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.hf_config import load_model_config

    return load_model_config(resolve_model_dir(model)).vocab_size


def _encoder(args):
    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model_dir(args.tokenizer or args.model))
    return lambda text: tok.encode(text, add_special_tokens=False)


def print_table(m: ServingMetrics, title: str) -> None:
    f = m.flat()
    print(f"\n{'=' * 18} {title} {'=' * 18}")
    rows = [("Successful requests", m.completed), ("Failed requests", m.num_failed),
            ("Benchmark duration (s)", f"{m.duration_s:.2f}"),
            ("Total input tokens", m.total_input_tokens),
            ("Total generated tokens", m.total_output_tokens),
            ("Request throughput (req/s)", f"{m.request_throughput:.2f}"),
            ("Output token throughput (tok/s)", f"{m.output_throughput:.2f}"),
            ("Total token throughput (tok/s)", f"{m.total_token_throughput:.2f}")]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s)", f"{m.request_goodput:.2f}"))
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        for stat in ("mean", "median", "p90", "p99"):
            key = f"{name}_{stat}_ms"
            if key in f:
                rows.append((f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} "
                             f"{label} (ms)", f"{f[key]:.2f}"))
    for k, v in rows:
        print(f"{k:<40}{v:>12}")


def _result(args, rate: float, m: ServingMetrics, timelines: list[RequestTimeline],
            **extra) -> dict:
    ok = [t for t in timelines if t.success and t.token_times]
    return {**extra, "request_rate": rate, "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, "metrics": m.flat(),
            "ttfts_ms": [t.ttft * 1e3 for t in ok],
            "tpots_ms": [t.tpot * 1e3 for t in ok if t.tpot is not None],
            "e2es_ms": [t.e2e * 1e3 for t in ok],
            "errors": [t.error for t in timelines if t.error][:20]}


async def _run_sampled(args, ep: Endpoint, requests: list[SampleRequest], rate: float,
                       offsets: list[float] | None = None
                       ) -> tuple[list[RequestTimeline], float, list[dict]]:
    """run_benchmark while ``metrics_sampler`` scrapes the server every --sample-interval s."""
    import httpx

    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        sampler = None
        if args.sample_interval > 0:
            sampler = asyncio.create_task(sample_metrics(client, ep.base_url, stop,
                                                         args.sample_interval))
        try:
            timelines, duration = await run_benchmark(
                ep.base_url, ep.model, requests, rate, args.burstiness, args.max_concurrency,
                args.seed, progress=not args.no_progress, offsets=offsets)
        finally:
            stop.set()
        samples = await sampler if sampler is not None else []
    return timelines, duration, add_bandwidth(samples)


def bench_rate(args, requests: list[SampleRequest], slo: Slo, ep: Endpoint, rate: float,
               title: str = "", offsets: list[float] | None = None) -> dict:
    """One run of ``requests`` at ``rate`` (or at ``offsets``) against ``ep``: a result row
    (metrics, samples, and the prefix cache hit rate in tokens where the server exports it)."""
    before = scrape(ep.base_url)
    timelines, duration, samples = asyncio.run(_run_sampled(args, ep, requests, rate, offsets))
    hit_rate = prefix_hit_rate(before, scrape(ep.base_url))
    m = compute_metrics(timelines, duration, slo)
    print_table(m, title or "Serving Benchmark Result")
    if hit_rate is not None:
        print(f"{'Prefix cache hit rate (tokens)':<40}{hit_rate:>12.3f}")
    return {**_result(args, rate, m, timelines), "samples": samples,
            "prefix_hit_rate": hit_rate}


def prefix_app_args(args, caching: bool, by_prefix: bool) -> dict:
    """Prefix-compare layout: --num-prefill prefill + 1 decode instances, no executor."""
    engine = {"num_threads": 1, "enable_prefix_caching": caching}
    return {"model": args.model, "dtype": args.dtype, "policy": "least_loaded",
            "policy_options": {"prefix_placement": by_prefix},
            "prefill": {"num_instances": args.num_prefill,
                        "engine": {**engine, "kv_cache_tokens": args.prefill_kv_tokens}},
            "decode": {"engine": {**engine, "kv_cache_tokens": args.decode_kv_tokens}},
            "executor": {"enabled": False}}


def prefix_compare(args, requests: list[SampleRequest], offsets: list[float] | None, slo: Slo
                   ) -> tuple[list[dict], dict[str, str]]:
    """The three PREFIX_SYSTEMS, one after another, on the same requests and send times."""
    port = _free_port()
    launchers = {name: functools.partial(adrenaline_system, prefix_app_args(args, *flags),
                                         name, port, args.model)
                 for name, flags in PREFIX_SYSTEMS.items()}
    # Warm-up prompts share no prefix with the workload, so no system starts with it cached.
    lens = sorted({r.prompt_len for r in requests})[:2]
    vocab = args.vocab_size or _vocab_size(args.tokenizer or args.model)
    warm = [random_requests(1, n, 4, vocab, seed=10_000 + i)[0] for i, n in enumerate(lens)]

    def warmup(ep: Endpoint) -> None:
        asyncio.run(run_benchmark(ep.base_url, ep.model, warm, progress=False))

    def bench(system: str, ep: Endpoint, rate: float) -> dict:
        return bench_rate(args, requests, slo, ep, rate, title=system, offsets=offsets)

    with ray_serve(args.num_cpus, port):
        return run_sweep(launchers, [args.request_rate], bench, warmup)


def prefix_table(rows: list[dict]) -> str:
    """Prefix-compare rows as a markdown table, with TTFT p50 relative to caching off."""
    base = next((r["metrics"]["ttft_p50_ms"] for r in rows if r["system"] == "cache_off"), None)
    head = ("| system | TTFT p50 ms | TTFT p99 ms | req/s | output tok/s | TPOT p50 ms | "
            "prefix hit rate | off / this, TTFT p50 |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        m = r["metrics"]
        ratio = base / m["ttft_p50_ms"] if base and m["ttft_p50_ms"] else None
        lines.append(f"| {r['system']} | {m['ttft_p50_ms']:.0f} | {m['ttft_p99_ms']:.0f} | "
                     f"{m['request_throughput']:.2f} | {m['output_throughput']:.1f} | "
                     f"{m['tpot_p50_ms']:.1f} | {_fmt(r.get('prefix_hit_rate'), '.3f')} | "
                     f"{_fmt(ratio, '.2f')}{'x' if ratio else ''} |")
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def sweep_launchers(args, port: int) -> dict[str, Launcher]:
    """--systems as launchers: adrenaline apps on Serve's port; vLLM on a port of its own."""
    out: dict[str, Launcher] = {}
    for s in args.systems.split(","):
        if s == VLLM_SYSTEM:
            out[s] = functools.partial(_vllm_launch, args)
        elif s in ADRENALINE_SYSTEMS:
            out[s] = functools.partial(adrenaline_system, sweep_app_args(args, s), s, port,
                                       args.model)
        else:
            raise SystemExit(f"unknown system {s!r} (known: "
                             f"{', '.join([*ADRENALINE_SYSTEMS, VLLM_SYSTEM])})")
    return out


def _vllm_launch(args):
    from adrenaline.bench.vllm_server import vllm_openai_server
    from adrenaline.model.resolve import resolve_model_dir

    return vllm_openai_server(str(resolve_model_dir(args.model)), args.model, _free_port(),
                              dtype=args.vllm_dtype, max_model_len=args.vllm_max_model_len,
                              cpus=args.vllm_cpus)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sweep(args, requests: list[SampleRequest], slo: Slo) -> tuple[list[dict], dict[str, str]]:
    """Every --systems entry at every --sweep-rates rate (Ray only when an adrenaline app runs)."""
    rates = [float(r) for r in args.sweep_rates.split(",")]
    port = _free_port()
    launchers = sweep_launchers(args, port)

    def warmup(ep: Endpoint) -> None:
        asyncio.run(run_benchmark(ep.base_url, ep.model, requests[:2], progress=False))

    def bench(system: str, ep: Endpoint, rate: float) -> dict:
        return bench_rate(args, requests, slo, ep, rate, title=f"{system} @ {rate:g} req/s")

    with contextlib.ExitStack() as stack:
        if any(s in ADRENALINE_SYSTEMS for s in launchers):
            stack.enter_context(ray_serve(args.num_cpus, port))
        return run_sweep(launchers, rates, bench, warmup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="tiny for a running app; small in sweep mode")
    ap.add_argument("--served-model", default=None, help="the name sent in requests (default --model)")
    ap.add_argument("--tokenizer", default=None, help="model dir/name for vocab and tokenizer")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="sweep mode: the app's dtype")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--dataset", default="random",
                    choices=["random", "sharegpt-synthetic", "sharegpt", "long-decode",
                             "multi-turn", "sharegpt-multi-turn"])
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--sharegpt-output-len", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=128, help="random: mean; synthetic: median")
    ap.add_argument("--output-len", type=int, default=128, help="random: mean; synthetic: median")
    ap.add_argument("--range-ratio", type=float, default=0.0)
    ap.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf: all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=None)
    ap.add_argument("--slo-tpot-ms", type=float, default=None)
    ap.add_argument("--slo-e2e-ms", type=float, default=None)
    ap.add_argument("--sweep-rates", default=None, help="e.g. 0.5,1,2: sweep mode")
    ap.add_argument("--systems", default="none,static,load_aware",
                    help="sweep mode: none, static, load_aware (adrenaline policies), vllm")
    ap.add_argument("--num-cpus", type=int, default=2, help="sweep mode: ray.init num_cpus")
    ap.add_argument("--decode-kv-tokens", type=int, default=None,
                    help="sweep mode (default 1536: KV-bound); prefix-compare (default 16384)")
    ap.add_argument("--prefill-kv-tokens", type=int, default=8192, help="sweep mode")
    ap.add_argument("--executor-kv-tokens", type=int, default=8192, help="sweep mode")
    ap.add_argument("--vllm-dtype", default="bfloat16", help="sweep mode: vLLM's --dtype")
    ap.add_argument("--vllm-max-model-len", type=int, default=2048, help="sweep mode")
    ap.add_argument("--vllm-cpus", default=None,
                    help="sweep mode: CPUs vLLM's OpenMP threads bind to, e.g. 1 (default: all)")
    ap.add_argument("--plot-dir", default="docs", help="sweep mode: where figures go")
    ap.add_argument("--num-conversations", type=int, default=12, help="multi-turn")
    ap.add_argument("--turns", type=int, default=5, help="multi-turn: turns per conversation")
    ap.add_argument("--system-len", type=int, default=128, help="multi-turn: shared system prompt")
    ap.add_argument("--user-len", type=int, default=64, help="multi-turn: tokens per user message")
    ap.add_argument("--answer-len", type=int, default=48,
                    help="multi-turn: tokens of each earlier answer in the history")
    ap.add_argument("--turn-gap-s", type=float, default=8.0, help="multi-turn: s between turns")
    ap.add_argument("--prefix-compare", action="store_true",
                    help="run the workload on caching off / on / on + placement by prefix")
    ap.add_argument("--num-prefill", type=int, default=2, help="prefix-compare: prefill instances")
    ap.add_argument("--sample-interval", type=float, default=1.0,
                    help="seconds between /metrics scrapes during a run (0: none)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = "small" if args.sweep_rates or args.prefix_compare else "tiny"
    if args.decode_kv_tokens is None:  # prefix-compare: decode must not be the bottleneck
        args.decode_kv_tokens = 16384 if args.prefix_compare else 1536
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.sweep_rates and args.dataset.endswith("multi-turn"):
        raise SystemExit("multi-turn datasets fix their own send times: use --request-rate "
                         "(conversations/s), with --prefix-compare or against --base-url")
    requests, offsets = build_workload(args)
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    workload = {"dataset": args.dataset, "num_prompts": len(requests),
                "input_len": args.input_len, "output_len": args.output_len,
                "range_ratio": args.range_ratio, "seed": args.seed}
    if offsets is not None:
        workload.update(num_conversations=args.num_conversations, turns=args.turns,
                        system_len=args.system_len, user_len=args.user_len,
                        answer_len=args.answer_len, turn_gap_s=args.turn_gap_s,
                        conversation_rate=args.request_rate,
                        mean_prompt_len=sum(r.prompt_len for r in requests) / len(requests),
                        history_fraction=history_fraction(requests))
    result = {**result_header("serving"), "model": args.model, "workload": workload,
              "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms}}
    if args.prefix_compare:
        result["layout"] = {"num_prefill": args.num_prefill, "num_decode": 1,
                            "prefill_kv_tokens": args.prefill_kv_tokens,
                            "decode_kv_tokens": args.decode_kv_tokens}
        result["rows"], result["skipped"] = prefix_compare(args, requests, offsets, slo)
    elif args.sweep_rates:
        result["rows"], result["skipped"] = sweep(args, requests, slo)
    else:
        ep = Endpoint(args.base_url, args.served_model or args.model)
        result.update(bench_rate(args, requests, slo, ep, args.request_rate, offsets=offsets))
    write_result(result, args.out)
    if args.prefix_compare:
        print(prefix_table(result["rows"]))
    elif args.sweep_rates:
        print(sweep_table(result["rows"]))
        try:
            from adrenaline.bench.plots import plot_sweep
        except ImportError as e:
            print(f"no plots ({e})", file=sys.stderr)
        else:
            for path in plot_sweep(result, args.plot_dir):
                print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
