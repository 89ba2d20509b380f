"""How many requests rerun when one worker dies, under N concurrent streams (issue 17, item 3).

    PYTHONPATH=. .venv/bin/python loadtests/reruns_per_death.py --streams 16 --out reruns.json

Starts its own Ray cluster and, for each layout (1 prefill + its executor with 1 decode
worker, then with 2) and each recovery mode (``whole``: the whole cluster is replaced, as
before issue 17 item 3; ``partial``: only the lost actor), runs the router app ("tiny",
static offload ratio 0.5) and for each role (decode, executor, prefill) starts N staggered
greedy streams (64 tokens), kills that role's instance 0 (SIGKILL) once half the streams
are decoding, and records: streams in flight at the kill, those decoding and where (the
admission log), requests rerun (the router's ``num_reruns``), how many of them had been
decoding on a surviving actor, and whether every output equals the offline engine's.
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
from collections import Counter
from pathlib import Path


def app_args(num_decode: int, mode: str) -> dict:
    return {"model": "tiny", "decode": {"num_instances": num_decode},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 8192}},
            "policy": "static", "policy_options": {"ratio": 0.5},
            "recovery": {"partial": mode == "partial"}}


async def _one_death(client, router, role: str, prompts, params) -> dict:
    before = await router.stats.remote()
    logged = len(await router.admissions.remote())
    pid = (await router.worker_pids.remote())[role][0]
    n = len(prompts)
    ids: list[str | None] = [None] * n
    tokens, done, started = [0] * n, [False] * n, [False] * n

    async def stream(i: int, p) -> list[int]:
        await asyncio.sleep(0.05 * i)
        started[i] = True
        out = None
        async for out in client.stream(p, params):
            ids[i], tokens[i] = out.request_id, len(out.token_ids)
        done[i] = True
        return out.token_ids

    tasks = [asyncio.create_task(stream(i, p)) for i, p in enumerate(prompts)]
    while sum(t >= 2 and not d for t, d in zip(tokens, done)) < n // 2:
        await asyncio.sleep(0.01)
    where = {rid: (d, off) for rid, _, d, off, _ in (await router.admissions.remote())[logged:]}
    decoding = {ids[i]: where[ids[i]] for i in range(n)
                if tokens[i] >= 2 and not done[i] and ids[i] in where}
    in_flight = sum(s and not d for s, d in zip(started, done))
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 600)
    while (after := await router.stats.remote())["num_recoveries"] == before["num_recoveries"]:
        await asyncio.sleep(0.1)
    admissions = Counter(rid for rid, *_ in (await router.admissions.remote())[logged:])
    if role == "decode":
        depended = {rid for rid, (d, _) in decoding.items() if d == 0}
    elif role == "executor":
        depended = {rid for rid, (_, off) in decoding.items() if off}
    else:
        depended = set()
    return {"role": role, "streams": n, "in_flight_at_kill": in_flight,
            "decoding_at_kill": len(decoding), "decoding_on_lost_actor": len(depended),
            "reruns": after["num_reruns"] - before["num_reruns"],
            "decoding_elsewhere_rerun": sum(admissions[rid] > 1
                                            for rid in set(decoding) - depended),
            "cluster_replaced": after["num_cluster_replacements"]
            - before["num_cluster_replacements"],
            "all_done_after_s": round(time.monotonic() - t0, 2), "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--decode", default="1,2", help="decode instances per layout, e.g. 1,2")
    ap.add_argument("--modes", default="whole,partial")
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
    results = []
    try:
        for num_decode in map(int, a.decode.split(",")):
            for mode in a.modes.split(","):
                name = f"reruns-{num_decode}d-{mode}"
                serve.run(build_router_app(app_args(num_decode, mode)), name=name,
                          route_prefix=None)
                client = Client(app_name=name)
                router = serve.get_deployment_handle("Router", app_name=name)
                for role in ("decode", "executor", "prefill"):
                    r = asyncio.run(_one_death(client, router, role, prompts, params))
                    r.update(layout=f"1P+E {num_decode}D", mode=mode,
                             exact=r.pop("outputs") == expected)
                    print(json.dumps(r), flush=True)
                    results.append(r)
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(a.out).write_text(json.dumps({"command": " ".join(["python"] + sys.argv),
                                       "results": results}, indent=2))


if __name__ == "__main__":
    main()
