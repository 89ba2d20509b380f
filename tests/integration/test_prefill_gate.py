"""The prefill gate on a real cluster (limits.prefill_when_admissible): requests beyond
what the decode pool holds are not prefilled until it frees room, and every token still
equals the offline engine's."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

APP = "gate1p1d"


@pytest.fixture(scope="module")
def client(ray_cluster):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    # Decode holds 10 blocks of 16 tokens: 3 requests of 14 + 20 tokens (3 blocks each).
    args = {"model": "tiny", "limits": {"prefill_when_admissible": True},
            "prefill": {"num_instances": 1},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": 160,
                                                      "block_size": 16}}}
    serve.run(build_router_app(args), name=APP, route_prefix=None)
    yield Client(app_name=APP)
    serve.delete(APP)


def test_requests_beyond_decode_room_wait_unprefilled_until_it_frees(client):
    """Forced, not timed: the decode steps are held, so the 3 requests the decode pool
    holds never finish; the other 5 must then wait at the gate with no first token and
    nothing of theirs on the prefill instance (without the gate all 8 would be prefilled
    and 5 parked there). Once the steps go on, all 8 finish with the offline tokens."""
    from ray import serve

    rng = random.Random(1)
    prompts = [[rng.randrange(5, 4000) for _ in range(14)] for _ in range(8)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]
    router = serve.get_deployment_handle("Router", app_name=APP)
    first = [0] * len(prompts)  # tokens each stream has had so far

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in client.stream(prompts[i], params):
            tokens = list(out.token_ids)
            first[i] = len(tokens)
        return tokens

    async def state() -> tuple[dict, list, list]:
        return (await router.stats.remote(), await client.metrics(), await client.check_kv())

    def settled(stats, metrics, reports) -> bool:
        decode = next(m for m in metrics if m.role == "decode")
        prefill = next(m for m in metrics if m.role == "prefill")
        prefill_kv = next(r for r in reports if r.role == "prefill")
        return (stats["num_gate_waiting"] == 5 and decode.num_waiting + decode.num_running == 3
                and prefill.num_waiting + prefill.num_running == 0 and not prefill_kv.owners)

    async def run():
        await router.hold_steps.remote("decode", 0, True)
        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
            for _ in range(600):
                s = await state()
                if settled(*s):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # nothing frees while the steps are held: still so
            stats, metrics, reports = await state()
            gated = (stats["num_gate_waiting"], stats["num_gate_passed"], stats["num_queued"])
            held = settled(stats, metrics, reports)
            prefill_owners = next(r for r in reports if r.role == "prefill").owners
            had_first = sorted(first)
        finally:
            await router.hold_steps.remote("decode", 0, False)
        return gated, held, prefill_owners, had_first, await asyncio.gather(*tasks)

    gated, held, prefill_owners, had_first, outs = asyncio.run(run())
    # 5 wait at the gate (counted as queued), none passed and unadmitted, 3 decoding.
    assert gated == (5, 0, 5), gated
    assert held and prefill_owners == {}, prefill_owners
    assert had_first == [0] * 5 + [1] * 3, had_first  # only the admitted 3 had a token
    assert outs == expected
    for _ in range(100):  # each attempt's end is counted just after its last token
        stats = router.stats.remote().result()
        counts = (stats["num_gate_waiting"], stats["num_gate_passed"], stats["num_queued"])
        if counts == (0, 0, 0):
            break
        time.sleep(0.05)
    assert counts == (0, 0, 0), counts
    asyncio.run(assert_kv_sound_async(client))
