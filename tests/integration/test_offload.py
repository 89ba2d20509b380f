"""Attention offloading: any policy, any layout, same greedy tokens as the offline engine."""

from __future__ import annotations

import asyncio
import random

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

PARAMS = SamplingParams(max_tokens=12, temperature=0)


def _prompts(n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 4000) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def expected():
    return [o.token_ids for o in LLM("tiny").generate(_prompts(), PARAMS)]


def _deploy(name: str, num_prefill: int, policy: str, options: dict, decode_kv: int = 4096,
            transport: str = "auto"):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    args = {"model": "tiny", "prefill": {"num_instances": num_prefill},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": decode_kv}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "policy": policy, "policy_options": options, "transport": transport}
    serve.run(build_router_app(args), name=name, route_prefix=None)
    return Client(app_name=name)


async def _run_all(client, prompts, params):
    return await asyncio.gather(*[client.generate(p, params) for p in prompts])


async def _assert_idle(client) -> None:
    await assert_kv_sound_async(client)
    for m in await client.metrics():
        assert m.kv_blocks_used == 0 and m.num_running == 0 and m.num_waiting == 0, m


# transport "auto" links actors of one node through shared memory; one case keeps gloo.
CASES = [
    ("static-all-1p1d", 1, "static", {"ratio": 1.0}, 4096, "auto"),
    ("static-half-2p1d", 2, "static", {"ratio": 0.5}, 4096, "auto"),
    ("static-half-1p1d-gloo", 1, "static", {"ratio": 0.5}, 4096, "gloo"),
    # A 96-token decode pool cannot hold the batch: load_aware must offload the rest. (These
    # contexts are too short to hide an executor's attention behind local attention, so
    # rule (d) is off here: tests/unit/test_policies.py covers it.)
    ("load-aware-1p1d", 1, "load_aware", {"tpot_slo_ms": 10000, "hide_remote": False}, 96,
     "auto"),
    ("load-aware-2p1d", 2, "load_aware", {"tpot_slo_ms": 10000, "hide_remote": False}, 96,
     "auto"),
]


@pytest.mark.parametrize("name, num_prefill, policy, options, decode_kv, transport", CASES,
                         ids=[c[0] for c in CASES])
def test_offloaded_greedy_matches_offline(ray_cluster, expected, name, num_prefill, policy,
                                          options, decode_kv, transport):
    from ray import serve

    client = _deploy(name, num_prefill, policy, options, decode_kv, transport)
    try:
        outs = asyncio.run(_run_all(client, _prompts(), PARAMS))
        assert [o.token_ids for o in outs] == expected
        links = serve.get_app_handle(name).stats.remote().result()["links"]
        # every prefill-decode and decode-executor pair, each of the kind asked for
        assert len(links) == 2 * num_prefill
        assert set(links.values()) == {"shm" if transport == "auto" else transport}
        metrics = asyncio.run(client.metrics())
        executors = [m for m in metrics if m.role == "executor"]
        assert len(executors) == num_prefill
        assert sum(m.num_steps for m in executors) > 0  # attention really ran remotely
        # an executor's CPU time while busy is within its busy time (5 ms of clock slack
        # over the run), for every executor that served a step
        assert all(0 < m.busy_cpu_s <= m.busy_s + 0.005 for m in executors if m.num_steps)
        # the decode step's own CPU time is part of its wall time, never more
        decode = [m for m in metrics if m.role == "decode"]
        assert all(0 < m.step_cpu_s <= m.step_time_s for m in decode)
        if policy == "load_aware":
            assert all(m.local_kv_tokens_sum > 0 for m in decode)  # 96 tokens held some
            _assert_step_feedback(client, serve.get_app_handle(name))
        asyncio.run(_assert_idle(client))
    finally:
        serve.delete(name)


def _assert_step_feedback(client, router) -> None:
    """The router passes the decode's heartbeat metrics to load_aware, whose step model
    then carries the ratio of served to modeled steps (1.0 until it has one). Each round
    decodes 30 more steps; a heartbeat after a round that followed the first one it saw
    measures them."""
    import time

    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    deadline = time.monotonic() + 30
    while (scale := router.stats.remote().result()["step_scale"]) == [1.0]:
        assert time.monotonic() < deadline, "no decode steps reached the policy"
        asyncio.run(client.generate(_prompts(1)[0], params))
        time.sleep(0.5)
    assert len(scale) == 1 and 0.5 <= scale[0] <= 4.0


def test_offloaded_kv_never_allocated_on_decode(ray_cluster):
    from ray import serve

    client = _deploy("offload-kv-placement", 1, "static", {"ratio": 1.0})

    async def run():
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        seen = None
        router = serve.get_deployment_handle("Router", app_name="offload-kv-placement")
        agen = client.stream(list(range(10, 60)), params)
        async for out in agen:
            if len(out.token_ids) == 20:
                await router.hold_steps.remote("decode", 0, True)  # certainly mid-decode
                seen = {m.role: m for m in await client.metrics()}
                await router.hold_steps.remote("decode", 0, False)
                break
        await agen.aclose()
        return seen

    try:
        during = asyncio.run(run())
        assert during["decode"].num_running == 1 and during["decode"].num_offloaded == 1
        assert during["decode"].kv_blocks_used == 0
        assert during["executor"].kv_blocks_used >= 4  # 50 + 20 tokens in 16-token blocks
        for _ in range(50):  # the cancelled request's executor pages are freed
            if all(m.kv_blocks_used == 0 for m in asyncio.run(client.metrics())):
                break
        asyncio.run(_assert_idle(client))
    finally:
        serve.delete("offload-kv-placement")
