"""How many requests rerun when one worker dies, under N concurrent streams (issue 17, item 3).

    PYTHONPATH=. .venv/bin/python loadtests/reruns_per_death.py --streams 16 --out reruns.json

Starts its own Ray cluster and the router app ("tiny", 1 prefill + its executor, 1 decode,
static offload ratio 0.5), and for each role (decode, executor, prefill) starts N staggered
greedy streams (64 tokens), kills that role's process (SIGKILL) once the streams are well
under way, and records: streams in flight at the kill, requests rerun (the router's
``num_reruns``), and whether every output equals the offline engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

APP_ARGS = {"model": "tiny", "executor": {"enabled": True, "engine": {"kv_cache_tokens": 8192}},
            "policy": "static", "policy_options": {"ratio": 0.5}}


async def _one_death(client, router, role: str, prompts, params) -> dict:
    before = await router.stats.remote()
    pid = (await router.worker_pids.remote())[role][0]
    seen, live = [0], [0]

    async def stream(i: int, p) -> list[int]:
        await asyncio.sleep(0.05 * i)
        live[0] += 1
        out = None
        try:
            async for out in client.stream(p, params):
                seen[0] += 1
        finally:
            live[0] -= 1
        return out.token_ids

    tasks = [asyncio.create_task(stream(i, p)) for i, p in enumerate(prompts)]
    while seen[0] < 4 * len(prompts):
        await asyncio.sleep(0.01)
    in_flight = live[0]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 600)
    after = await router.stats.remote()
    return {"role": role, "streams": len(prompts), "in_flight_at_kill": in_flight,
            "reruns": after["num_reruns"] - before["num_reruns"],
            "recoveries": after["num_recoveries"] - before["num_recoveries"],
            "all_done_after_s": round(time.monotonic() - t0, 2), "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--out", default="reruns.json")
    a = ap.parse_args()

    import ray
    from ray import serve

    from adrenaline import LLM, SamplingParams
    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    rng = random.Random(17)
    prompts = [[rng.randrange(5, 4000) for _ in range(rng.randint(3, 40))]
               for _ in range(a.streams)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(build_router_app(APP_ARGS), name="reruns", route_prefix=None)
        client = Client(app_name="reruns")
        router = serve.get_deployment_handle("Router", app_name="reruns")
        results = []
        for role in ("decode", "executor", "prefill"):
            r = asyncio.run(_one_death(client, router, role, prompts, params))
            r["exact"] = r.pop("outputs") == expected
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(a.out).write_text(json.dumps({"command": " ".join(["python"] + sys.argv),
                                       "app_args": APP_ARGS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
