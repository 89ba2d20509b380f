"""Partial recovery (issue 17, item 3): one actor lost, only what depended on it reruns.

A 1-prefill (+ executor), 2-decode cluster, half the requests offloaded. For each role,
index 0 is killed (SIGKILL) mid-stream. Which requests depended on it is read from the
outside, at the kill: the router's admission log (where each admitted request went) and
how many tokens each stream had (two or more: it was decoding, past its handoff). A
request admitted twice was rerun (a rerun is placed and admitted again).

- decode 0 lost: requests decoding on decode 0 rerun; those decoding on decode 1 do not;
- executor 0 lost: offloaded requests rerun; local ones do not;
- prefill 0 lost: no request that was already decoding reruns.

Every output equals the offline engine's, the whole cluster is never replaced, and every
page is free afterwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

APP = "partial-recovery"
NUM_STREAMS = 12


def _params(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    return SamplingParams(max_tokens=64, temperature=0.8, top_k=50, seed=2000 + i,
                          ignore_eos=True)


def _prompts(seed: int, n: int = NUM_STREAMS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 4000) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


EXECUTOR = {"enabled": True, "engine": {"kv_cache_tokens": 8192}}


def _deploy(**layout):
    """(Re)deploy the module's app: "tiny", a 30 s hang timeout, and ``layout``."""
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    serve.delete(APP)  # the module's apps run one after another, under one name
    serve.run(build_router_app({"model": "tiny", "recovery": {"hang_timeout_s": 30}, **layout}),
              name=APP, route_prefix=None)
    return Client(app_name=APP)


@pytest.fixture(scope="module")
def client(ray_cluster):
    """1 prefill worker with its executor, 2 decode workers, half the requests offloaded."""
    from ray import serve

    yield _deploy(decode={"num_instances": 2}, executor=EXECUTOR, policy="static",
                  policy_options={"ratio": 0.5})
    serve.delete(APP)


async def _kill_one(client, role: str, prompts, ready) -> dict:
    """Stream ``prompts``, kill ``role`` 0 once ``ready(decoding)`` (streams past their
    handoff -> (prefill, decode, offloaded)) says the kill proves something, and collect
    what the checks need. Every decode worker's steps are held from that check to the
    kill, so the streams decoding at the kill are exactly those checked."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    before = await router.stats.remote()
    logged_before = len(await router.admissions.remote())
    pid = (await router.worker_pids.remote())[role][0]
    ids: list[str | None] = [None] * len(prompts)
    tokens = [0] * len(prompts)
    done = [False] * len(prompts)
    gaps: list[list[float]] = [[] for _ in prompts]  # seconds between deltas, per stream

    async def stream(i: int) -> list[int]:
        await asyncio.sleep(0.08 * i)
        out, last = None, None
        async for out in client.stream(prompts[i], _params(i)):
            ids[i] = out.request_id
            tokens[i] = len(out.token_ids)
            now = time.monotonic()
            if last is not None:
                gaps[i].append(now - last)
            last = now
        done[i] = True
        return out.token_ids

    tasks = [asyncio.create_task(stream(i)) for i in range(len(prompts))]
    num_decode = sum(m.role == "decode" for m in await client.metrics())
    while True:
        while sum(n >= 2 and not d for n, d in zip(tokens, done)) < len(prompts) // 2:
            await asyncio.sleep(0.01)  # half the streams decoding
        await asyncio.gather(*[router.hold_steps.remote("decode", j, True)
                               for j in range(num_decode)])
        await asyncio.sleep(0.05)  # deltas of the last steps reach the streams
        # At the kill: where each admitted request went, and how far each stream had got.
        admitted = {rid: (p, d, off) for rid, p, d, off, _ in
                    (await router.admissions.remote())[logged_before:]}
        at_kill = [(ids[i], tokens[i], done[i]) for i in range(len(prompts))]
        if ready(_decoding_at_kill({"admitted_at_kill": admitted, "at_kill": at_kill})):
            break
        await asyncio.gather(*[router.hold_steps.remote("decode", j, False)
                               for j in range(num_decode)])
        assert not all(done), "the kill never found requests decoding where it proves something"
        await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    await asyncio.gather(*[router.hold_steps.remote("decode", j, False)
                           for j in range(num_decode) if (role, j) != ("decode", 0)])
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
    while (after := await router.stats.remote())["num_recoveries"] == before["num_recoveries"]:
        assert time.monotonic() - t_kill < 180, f"no replacement serves: {after}"
        await asyncio.sleep(0.1)
    await assert_kv_sound_async(client, idle=True, timeout_s=60)
    log = (await router.admissions.remote())[logged_before:]
    return {"outs": outs, "admitted_at_kill": admitted, "at_kill": at_kill,
            "admissions": Counter(rid for rid, *_ in log), "before": before, "after": after}


def _decoding_at_kill(r: dict) -> dict[str, tuple[int, int, bool]]:
    """Streams past their handoff and unfinished at the kill -> (prefill, decode, offloaded)."""
    return {rid: r["admitted_at_kill"][rid] for rid, n, finished in r["at_kill"]
            if rid in r["admitted_at_kill"] and n >= 2 and not finished}


# A kill proves something only if, at that moment, requests were decoding both on the lost
# actor and elsewhere: the kill waits for that (``ready``), with the decode steps held.


def _check_round(r: dict, prompts, expected, lost_of) -> tuple[set, dict]:
    assert r["outs"] == expected  # exact, greedy and seeded sampled alike
    before, after = r["before"], r["after"]
    assert after["num_cluster_replacements"] == before["num_cluster_replacements"], after
    assert after["num_recoveries"] - before["num_recoveries"] == 1, after
    decoding = _decoding_at_kill(r)
    lost = {rid for rid, where in decoding.items() if lost_of(where)}
    kept = set(decoding) - lost
    print(f"{len(decoding)} decoding at the kill, {len(lost)} depended on it; reruns "
          f"{after['num_reruns'] - before['num_reruns']}")
    for rid in kept:  # streamed on: admitted once
        assert r["admissions"][rid] == 1, (rid, decoding[rid], r["admissions"])
    for rid in lost:  # reran: placed and admitted again
        assert r["admissions"][rid] == 2, (rid, decoding[rid], r["admissions"])
    # Every rerun was one of them or a request not yet decoding at the kill.
    reruns = after["num_reruns"] - before["num_reruns"]
    assert len(lost) <= reruns <= len(lost) + (len(prompts) - len(decoding)), reruns
    return lost, {rid: decoding[rid] for rid in kept}


def _rounds(client, role: str, seed: int, lost_of, need_lost: bool, n: int = NUM_STREAMS,
            offline=None, kept_of=lambda where: True) -> None:
    """A kill round that has a request decoding on a surviving actor (``kept_of`` says
    which count) and, with ``need_lost``, one decoding on the lost actor."""
    def ready(decoding: dict) -> bool:
        kept = [w for w in decoding.values() if not lost_of(w) and kept_of(w)]
        return bool(kept) and (not need_lost or any(lost_of(w) for w in decoding.values()))

    prompts = _prompts(seed, n)
    expected = [o.token_ids for o in offline.generate(prompts, [_params(i) for i in
                                                                range(len(prompts))])]
    r = asyncio.run(_kill_one(client, role, prompts, ready))
    lost, kept = _check_round(r, prompts, expected, lost_of)
    assert any(kept_of(where) for where in kept.values()), \
        "no request was decoding on a surviving actor at the kill"
    assert lost or not need_lost, "no request depended on the killed actor"


@pytest.mark.parametrize("role", ["decode", "executor", "prefill"])
def test_only_requests_on_the_lost_actor_rerun(client, offline, role):
    # (prefill, decode, offloaded) of a request decoding at the kill -> did it depend on
    # the killed instance 0? A prefill worker holds nothing of a request once it decodes.
    lost_of = {"decode": lambda w: w[1] == 0, "executor": lambda w: w[2],
               "prefill": lambda w: False}[role]
    _rounds(client, role, {"decode": 11, "executor": 12, "prefill": 13}[role], lost_of,
            need_lost=role != "prefill", offline=offline)


@pytest.fixture(scope="module")
def client_2p(ray_cluster, client):
    """2 prefill workers without executors, 1 decode worker (after ``client``'s tests)."""
    return _deploy(prefill={"num_instances": 2}, policy="least_loaded")


def test_prefill_without_executor_replaced_alone(client_2p, offline):
    """A prefill worker with no bundle of its own is replaced alone too; no request that
    was decoding reruns, and both prefill workers serve afterwards."""
    _rounds(client_2p, "prefill", 14, lambda w: False, need_lost=False, offline=offline)
    # Afterwards requests are placed on both prefill workers again and come out exact.
    prompts = _prompts(14)[:6]
    expected = [o.token_ids for o in offline.generate(prompts, [_params(i) for i in
                                                                range(len(prompts))])]
    again = asyncio.run(_kill_free_round(client_2p, prompts))
    assert again["outs"] == expected
    assert {p for p, _, _ in again["placed"]} == {0, 1}


async def _kill_free_round(client, prompts) -> dict:
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    logged = len(await router.admissions.remote())
    outs = await asyncio.gather(*[client.generate(p, _params(i))
                                  for i, p in enumerate(prompts)])
    log = (await router.admissions.remote())[logged:]
    return {"outs": [o.token_ids for o in outs], "placed": [(p, d, off) for _, p, d, off, _ in log]}


@pytest.fixture(scope="module")
def client_2e(ray_cluster, client_2p):
    """2 prefill workers, each with its executor, 1 decode worker (after ``client_2p``)."""
    return _deploy(prefill={"num_instances": 2}, executor=EXECUTOR, policy="static",
                   policy_options={"ratio": 0.5})


def test_one_of_two_executors_lost(client_2e, offline):
    """The decode worker's steps exchange with both executors; executor 0 dies mid-run. The
    step in flight walks executor 1 to its end and is retried: requests offloaded to
    executor 1, and local ones, stream on (admitted once); those on executor 0 rerun."""
    _rounds(client_2e, "executor", 15, lambda w: w[2] and w[0] == 0, need_lost=True, n=20,
            offline=offline, kept_of=lambda w: w[2] and w[0] == 1)
