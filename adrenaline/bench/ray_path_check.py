"""The Ray actor path on one machine (issue 11, 2c): serve a YAML's app, compare with offline.

Starts a local Ray cluster, serves the app of ``--config`` (a `serve run` YAML) as
`serve run` would, waits for /health, sends greedy token-id prompts over HTTP at once,
then checks the served texts against the offline engine (``LLM``) on the same prompts,
and every worker's KV audit. Prints one table line; writes ``ray_path.json`` to ``--out``.

  python -m adrenaline.bench.ray_path_check --config serve_configs/gpu-1gpu.yaml --out DIR
  ... --cpu    the same layout on CPU at tiny sizes (float32, no GPUs): CI's dry run

Exit status 1 when a request fails or, in float32, when any text differs (bf16 greedy
tokens may diverge under different batch shapes: their first differing character is
recorded per request instead, as in gpu_check's offload_tput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import yaml

APP = "ray-path-check"


def cpu_layout(args: dict) -> dict:
    """The same roles and policy on CPU: tiny model, float32, no GPUs, small KV budgets."""
    out = {**args, "model": "tiny", "dtype": "float32", "device": "cpu", "transport": "gloo"}
    budgets = {"prefill": 4096, "decode": 256, "executor": 4096}  # decode: a full pool offloads
    # At these tiny contexts remote attention cannot hide behind local attention: offload
    # for capacity anyway, so that the check runs the executor path.
    out["policy_options"] = {**(out.get("policy_options") or {}), "hide_remote": False}
    for role in ("prefill", "decode", "executor"):
        cfg = dict(out.get(role) or {})
        engine = {k: v for k, v in (cfg.get("engine") or {}).items() if k != "kv_cache_bytes"}
        cfg["engine"] = {**engine, "kv_cache_tokens": budgets[role], "num_threads": 1}
        cfg.pop("num_gpus", None)
        cfg.pop("sm_count", None)
        out[role] = cfg
    return out


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(length // 2, length))]
            for _ in range(n)]


async def _send_all(base_url: str, model: str, prompts: list[list[int]], max_tokens: int):
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(prompt):
            r = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            return r.status_code, (r.json() if r.status_code == 200 else r.text)
        return await asyncio.gather(*[one(p) for p in prompts])


def _first_diff(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(app_args: dict, num_requests: int, prompt_len: int, max_tokens: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.engine.llm import LLM
    from adrenaline.sampling_params import SamplingParams
    from adrenaline.serve.app import build_app
    from adrenaline.app_config import parse_app_args
    from adrenaline.transport import find_free_port

    parsed = parse_app_args(app_args)
    result: dict = {"args": app_args}
    t0 = time.perf_counter()
    own_cluster = not ray.is_initialized()  # else: a caller's cluster (and Serve), kept
    if own_cluster:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": find_free_port()})  # no-op if up
        serve.run(build_app(app_args), name=APP, route_prefix="/")
        from ray.serve.context import _get_global_client

        port = ray.get(_get_global_client()._controller.get_http_config.remote()).port
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while httpx.get(f"{base}/health", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the app never became healthy")
            time.sleep(0.5)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        client = Client(APP)
        vocab = asyncio.run(client.model_info()).vocab_size
        prompts = _prompts(num_requests, prompt_len, vocab, seed=0)
        t1 = time.perf_counter()
        answers = asyncio.run(_send_all(base, parsed.model_name, prompts, max_tokens))
        result["http_s"] = round(time.perf_counter() - t1, 2)
        metrics = asyncio.run(client.metrics())
        result["executor_steps"] = sum(m.num_steps for m in metrics if m.role == "executor")
        reports = asyncio.run(client.check_kv())
        result["kv_sound"] = all(not r.problems for r in reports)
        result["kv_blocks_left"] = sum(m.kv_blocks_used for m in metrics)
    finally:
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP)
    failed = [a for a in answers if a[0] != 200]
    result["failed"] = [f"{code}: {str(body)[:200]}" for code, body in failed]
    llm = LLM(parsed.model, dtype=parsed.dtype, device=parsed.device)
    refs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True))
    served = [body["choices"][0]["text"] if code == 200 else None for code, body in answers]
    result["equal"] = sum(s == r.text for s, r in zip(served, refs))
    result["requests"] = len(prompts)
    result["first_diff_chars"] = [None if s is None else _first_diff(s, r.text)
                                  for s, r in zip(served, refs)]
    result["dtype"] = str(llm.engine.dtype).removeprefix("torch.")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_configs/gpu-1gpu.yaml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu", action="store_true", help="the layout on CPU at tiny sizes")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64, help="longest prompt, in tokens")
    ap.add_argument("--max-tokens", type=int, default=24)
    opts = ap.parse_args(argv)
    (app,) = yaml.safe_load(Path(opts.config).read_text())["applications"]
    app_args = cpu_layout(app["args"]) if opts.cpu else app["args"]
    result = run(app_args, opts.num_requests, opts.prompt_len, opts.max_tokens)
    exact = result["dtype"] == "float32"
    ok = (not result["failed"] and result["kv_sound"] and result["kv_blocks_left"] == 0
          and (result["equal"] == result["requests"] or not exact))
    result["status"] = "ok" if ok else "FAILED"
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "ray_path.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"ray_path     {result['status']:9s} start {result['startup_s']} s, "
          f"{result['requests']} requests in {result['http_s']} s; equal to offline "
          f"{result['equal']}/{result['requests']} ({result['dtype']}); executor steps "
          f"{result['executor_steps']}; KV sound {result['kv_sound']}, "
          f"blocks left {result['kv_blocks_left']}; failed {len(result['failed'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
