"""Cancellation: handle calls cancelled at random points (before prefill, during the executor
adopt, mid-decode) free every page on prefill, decode and executor; nothing else is disturbed.

Layout: 2 prefill (+ executors) and 1 decode; static ratio 0.5, so half the requests are
offloaded and their cancellation races the executor's adopt.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

APP = "cancel"


@pytest.fixture(scope="module")
def client(ray_cluster):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    args = {"model": "tiny", "prefill": {"num_instances": 2},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "policy": "static", "policy_options": {"ratio": 0.5}}
    serve.run(build_router_app(args), name=APP, route_prefix=None)
    yield Client(app_name=APP)
    serve.delete(APP)


async def _consume(client, prompt, params, stop_after: int | None, delay_s: float) -> int:
    """Stream until ``stop_after`` outputs (None: to the end); returns tokens seen."""
    await asyncio.sleep(delay_s)
    n = 0
    agen = client.stream(prompt, params)
    try:
        async for out in agen:
            n = len(out.token_ids)
            if stop_after is not None and n >= stop_after:
                break
    finally:
        await agen.aclose()  # what a consumer that goes away does (a break alone does not)
    return n


def test_random_cancellations_free_every_page(client):
    rng = random.Random(6)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

    async def run():
        tasks = []
        for i in range(24):
            prompt = [rng.randrange(5, 4000) for _ in range(rng.randint(3, 60))]
            kind = i % 3
            if kind == 0:  # a consumer that stops reading after a few tokens
                tasks.append(asyncio.create_task(
                    _consume(client, prompt, params, rng.randint(1, 6), rng.random() * 0.2)))
            else:  # a task cancelled at a random moment (often before or around handoff)
                t = asyncio.create_task(_consume(client, prompt, params, None, 0))
                asyncio.get_running_loop().call_later(rng.random() * (0.05 if kind == 1 else 1.0),
                                                      t.cancel)
                tasks.append(t)
        # Bounded: a handoff left waiting by a cancellation would hang its decode worker.
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 180)
        # Every page everywhere is free shortly after (each abort lands before the next step).
        await assert_kv_sound_async(client, idle=True, timeout_s=20)

    asyncio.run(run())


def test_serving_is_exact_after_cancellations(client):
    prompts = [[3, 14, 15], list(range(100, 131))]
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]

    async def run():
        outs = await asyncio.gather(*[client.generate(p, params) for p in prompts])
        await assert_kv_sound_async(client, idle=True)
        return [o.token_ids for o in outs]

    assert asyncio.run(run()) == expected


def test_abort_and_free_release_pages_before_the_next_step(client):
    """At the actors: once decode.abort / executor.free_request return, the pages are free
    (both run between steps, on the thread that owns the pool), with the request mid-stream."""
    import ray

    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def run():
        from ray import serve

        router = serve.get_deployment_handle("Router", app_name=APP)
        decode = ray.get_actor(f"{APP}-decode-0")
        executors = [ray.get_actor(f"{APP}-executor-{i}") for i in range(2)]
        agens = [client.stream(list(range(10 + i, 40 + i)), params) for i in range(4)]
        rids = []
        for agen in agens:  # each one decoding
            rids.append((await agen.__anext__()).request_id)
            await agen.__anext__()
        await router.hold_steps.remote("decode", 0, True)  # none finishes before the aborts
        before = [await e.check_kv.remote() for e in executors]
        for rid in rids:
            await decode.abort.remote(rid)
            rep = await decode.check_kv.remote()
            assert rid not in rep.owners and rep.ok, rep
            for e in executors:
                await e.free_request.remote(rid)
        for e in executors:
            rep = await e.check_kv.remote()
            assert rep.ok and rep.num_used == 0, rep
        await router.hold_steps.remote("decode", 0, False)
        for agen in agens:
            await agen.aclose()
        await assert_kv_sound_async(client, idle=True)
        return before

    before = asyncio.run(run())
    assert sum(rep.num_used for rep in before) > 0  # some of them really were offloaded
