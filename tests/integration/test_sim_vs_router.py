"""The simulator's admissions equal the live router's for the same requests.

A burst of requests with distinct prompt lengths on 1P2D with an executor, static
offloading of every other request. Every request is placed and admitted before any
finishes (long outputs), so each decision depends only on the order of arrivals,
not on timing: the simulator, fed the requests in the order the router placed them,
must make the same (prefill, decode, offload) decision for each. (Which of two
requests placed back to back is admitted first depends on when their prefills
return, so the admission order itself is not compared, only each decision.)
"""

from __future__ import annotations

import asyncio

from adrenaline import SamplingParams
from adrenaline.sim.simulator import SimConfig, Simulation
from adrenaline.sim.workload import SimArrival

N, OUT = 8, 96
LAYOUT = dict(prefill_kv_tokens=4096, decode_kv_tokens=4096, executor_kv_tokens=4096)


def test_simulated_admissions_equal_the_live_routers(ray_cluster):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    name = "sim-vs-router"
    args = {"model": "tiny", "prefill": {"engine": {"kv_cache_tokens": 4096}},
            "decode": {"num_instances": 2, "engine": {"kv_cache_tokens": 4096}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "policy": "static", "policy_options": {"ratio": 0.5}}
    serve.run(build_router_app(args), name=name, route_prefix=None)
    try:
        client = Client(app_name=name)
        params = SamplingParams(max_tokens=OUT, temperature=0, ignore_eos=True)
        prompts = [[10 + i] * (20 + 3 * i) for i in range(N)]

        async def burst():
            return await asyncio.gather(*[client.generate(p, params) for p in prompts])

        outs = asyncio.run(burst())
        router = serve.get_deployment_handle("Router", app_name=name)
        log = router.admissions.remote().result()
    finally:
        serve.delete(name)
    length = {o.request_id: len(o.prompt_token_ids) for o in outs}
    placed = sorted(log, key=lambda entry: entry[4])  # placement order
    live = {length[rid]: (p, d, off) for rid, p, d, off, _ in placed}
    assert len(log) == N and sorted(live) == sorted(map(len, prompts))

    cfg = SimConfig(model="tiny", hardware="cpu", num_prefill=1, num_decode=2, executor=True,
                    policy="static", policy_options={"ratio": 0.5}, sample_interval_s=0,
                    **LAYOUT)
    sim = Simulation(cfg).run([SimArrival(0.0, length[rid], OUT) for rid, *_ in placed])
    simulated = {sim.requests[int(rid.split("-")[1])].req.num_prompt_tokens: (p, d, off)
                 for rid, p, d, off in sim.router.admission_log}
    assert simulated == live
    assert {x[2] for x in live.values()} == {True, False}
    assert {x[1] for x in live.values()} == {0, 1}
