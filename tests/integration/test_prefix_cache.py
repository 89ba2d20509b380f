"""Prefix caching served: 2 prefill (+ executors) and 1 decode, static ratio 0.5 (local and
offloaded requests). Multi-turn conversations give the same greedy tokens as the offline
engine with caching off, follow their prefix to the instance that holds it, and a request
cancelled midway never frees a page another request with the same prefix uses."""

from __future__ import annotations

import asyncio
import random

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

APP = "prefix"
BS = 16
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _conversations(n: int = 4, turns: int = 3, seed: int = 3) -> list[list[list[int]]]:
    """Each conversation's prompts: every turn is the previous prompt plus new tokens."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        history, prompts = [], []
        for _ in range(turns):
            history = history + [rng.randrange(5, 4000) for _ in range(rng.randint(40, 70))]
            prompts.append(list(history))
        convs.append(prompts)
    return convs


@pytest.fixture(scope="module")
def client(ray_cluster):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    args = {"model": "tiny", "prefill": {"num_instances": 2, "engine": {"block_size": BS}},
            "decode": {"engine": {"block_size": BS}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096, "block_size": BS}},
            # prefix_balance 0: follow the prefix whatever the queues (the rule's own test
            # is in tests/unit/test_prefix_placement.py), so the hits below are exact.
            "policy": "static", "policy_options": {"ratio": 0.5, "prefix_balance": 0}}
    serve.run(build_router_app(args), name=APP, route_prefix=None)
    yield Client(app_name=APP)
    serve.delete(APP)


def _prefill_hits(metrics) -> int:
    return sum(m.prefix_cached_tokens for m in metrics if m.role == "prefill")


def test_multi_turn_greedy_matches_offline_without_caching(client):
    convs = _conversations()
    offline = LLM("tiny", enable_prefix_caching=False)

    async def run():
        hits = []
        for turn in range(3):  # turn k of every conversation at once, as a chat server sees it
            prompts = [c[turn] for c in convs]
            outs = await asyncio.gather(*[client.generate(p, PARAMS) for p in prompts])
            assert [o.token_ids for o in outs] == \
                [o.token_ids for o in offline.generate(prompts, PARAMS)]
            hits.append(_prefill_hits(await client.metrics()))
        return hits

    hits = asyncio.run(run())
    # Placement by prefix: from turn 2 on, every conversation's earlier full blocks are hit.
    expected = sum(len(c[t - 1]) // BS * BS for c in convs for t in (1, 2))
    assert hits[0] == 0 and hits[-1] == expected
    reports = asyncio.run(assert_kv_sound_async(client))
    assert sum(r.num_cached for r in reports if r.role == "prefill") > 0


def test_cancelling_never_frees_a_shared_page(client):
    shared = [random.Random(9).randrange(5, 4000) for _ in range(5 * BS)]
    long_params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompts = [shared + [7, i] for i in range(6)]
    want = LLM("tiny", enable_prefix_caching=False).generate(prompts, long_params)

    async def consume(prompt, stop_after):
        agen = client.stream(prompt, long_params)
        n, out = 0, None
        try:
            async for out in agen:
                n = len(out.token_ids)
                if stop_after is not None and n >= stop_after:
                    break
        finally:
            await agen.aclose()
        return out

    async def run():
        await client.generate(shared + [1], PARAMS)  # warm the cache with the shared prefix
        tasks = [consume(p, 3 if i % 2 else None) for i, p in enumerate(prompts)]
        return await asyncio.gather(*tasks)

    outs = asyncio.run(run())
    for i in range(0, 6, 2):  # the ones read to the end: exactly the uncached tokens
        assert outs[i].token_ids == want[i].token_ids
    asyncio.run(assert_kv_sound_async(client))
