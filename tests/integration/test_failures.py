"""Failure recovery: kill -9 (or stop: SIGSTOP, a hang) a decode worker, an attention executor
or a prefill worker while requests stream; the router replaces the cluster and reruns the
affected requests from their prompt plus the tokens already streamed. Every greedy request, and
every seeded sampled one, ends with exactly the offline engine's tokens (none repeated, none
lost) and every page is free afterwards.

If no replacement can be started, the affected requests end with a clear error (no hang),
and the router serves again once a replacement can start.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound_async

APP = "failures"
PARAMS = SamplingParams(max_tokens=48, temperature=0)
HANG_TIMEOUT_S = 8.0  # recovery.hang_timeout_s of the module's app (margin for a busy machine)


def _params(i: int) -> SamplingParams:
    """Every other request sampled with its own seed: its draws must survive a rerun."""
    if i % 2 == 0:
        return PARAMS
    return SamplingParams(max_tokens=48, temperature=0.8, top_k=50, seed=1000 + i)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 4000) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


@pytest.fixture(scope="module")
def client(ray_cluster):
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    # Half the requests offloaded: an executor's death hits requests that live only there.
    args = {"model": "tiny", "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "policy": "static", "policy_options": {"ratio": 0.5},
            "recovery": {"hang_timeout_s": HANG_TIMEOUT_S}}
    serve.run(build_router_app(args), name=APP, route_prefix=None)
    yield Client(app_name=APP)
    serve.delete(APP)


async def _stream(client, prompt, params, seen: list[int], delay_s: float) -> list[int]:
    """Stream one request; ``seen`` grows with every delta (to time the kill)."""
    await asyncio.sleep(delay_s)
    out = None
    async for out in client.stream(prompt, params):
        seen.append(1)
    assert out.finish_reason in ("length", "stop")
    return out.token_ids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _kill_mid_stream(client, role: str, prompts, sig: int = signal.SIGKILL,
                           params: SamplingParams | None = None
                           ) -> tuple[list[list[int]], dict]:
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    before = await router.stats.remote()
    pid = (await router.worker_pids.remote())[role][0]
    seen: list[int] = []
    # Staggered arrivals: at the kill some requests are decoding, some in prefill or handoff.
    first = len(prompts) - 2
    tasks = [asyncio.create_task(_stream(client, p, params or _params(i), seen, 0.05 * i))
             for i, p in enumerate(prompts[:first])]
    while len(seen) < 3 * first:  # well into the streams
        await asyncio.sleep(0.01)
    # The kill must find requests that depend on the actor (forced, not timed): the
    # prefill worker's (or the decode worker's) steps are held, and the last two requests
    # arrive now, so they wait there (queued; parked, one of them offloaded by ratio 0.5)
    # and none of the others finishes before the kill.
    held = "prefill" if role == "prefill" else "decode"
    await router.hold_steps.remote(held, 0, True)
    tasks += [asyncio.create_task(_stream(client, p, params or _params(first + i), seen, 0))
              for i, p in enumerate(prompts[first:])]
    while not _depends(role, await client.metrics()):
        await asyncio.sleep(0.01)
    os.kill(pid, sig)
    t_sig = time.monotonic()
    if held != role:
        await router.hold_steps.remote(held, 0, False)
    try:
        # Detected: the supervisor counts the loss as the replacement starts.
        while (await router.stats.remote())["num_losses"] == before["num_losses"]:
            assert time.monotonic() - t_sig < 120, "the failure was never detected"
            await asyncio.sleep(0.1)
        detected_s = time.monotonic() - t_sig
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        while _alive(pid):  # the stopped process is killed by the recovery
            assert time.monotonic() - t_sig < 60, f"hung {role} process {pid} still exists"
            await asyncio.sleep(0.1)
    finally:
        if sig == signal.SIGSTOP and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    # The replacement may still be starting when every request is done (a hung prefill
    # worker holds up no request that was already decoding): wait until it serves.
    while (after := await router.stats.remote())["state"] != "up" or \
            after["num_recoveries"] == before["num_recoveries"]:
        assert time.monotonic() - t_sig < 180, f"no replacement serves: {after}"
        await asyncio.sleep(0.1)
    await assert_kv_sound_async(client, idle=True, timeout_s=60)
    delta = {k: after[k] - before[k] for k in ("num_recoveries", "num_reruns",
                                               "num_cluster_replacements")}
    delta["detected_s"] = detected_s
    delta["hangs"] = after["hangs"][len(before["hangs"]):]
    return outs, delta


def _depends(role: str, metrics) -> bool:
    """Whether actor (role, 0) holds a request: one queued on the prefill worker, one
    running or parked on the decode worker, one adopted by the executor."""
    m = next(m for m in metrics if m.role == role and m.index == 0)
    return (m.num_waiting if role == "prefill" else m.num_running + m.num_waiting) > 0


@pytest.mark.parametrize("role", ["decode", "executor", "prefill"])
def test_kill_mid_stream_every_request_exact(client, offline, role):
    prompts = _prompts(8, seed={"decode": 1, "executor": 2, "prefill": 3}[role])
    expected = [o.token_ids for o in offline.generate(prompts, [_params(i) for i in range(8)])]
    outs, delta = asyncio.run(_kill_mid_stream(client, role, prompts))
    assert delta["num_recoveries"] == 1, delta
    assert delta["num_cluster_replacements"] == 0, delta  # the dead actor alone
    assert delta["num_reruns"] >= 1, delta  # some requests really were rerun
    # Exact tokens, greedy and seeded-sampled alike: none repeated, none lost, none redrawn.
    assert outs == expected


@pytest.mark.parametrize("role", ["decode", "executor", "prefill"])
def test_hang_mid_stream_detected_and_every_request_exact(client, offline, role):
    """SIGSTOP: the process lives but makes no progress; the heartbeat must catch it within
    about hang_timeout_s, kill it and recover exactly as from a death."""
    prompts = _prompts(8, seed={"decode": 5, "executor": 6, "prefill": 7}[role])
    expected = [o.token_ids for o in offline.generate(prompts, [_params(i) for i in range(8)])]
    outs, delta = asyncio.run(_kill_mid_stream(client, role, prompts, signal.SIGSTOP))
    print(f"hung {role}: detected {delta['detected_s']:.1f} s after SIGSTOP; "
          f"hangs reported {delta['hangs']}; reruns {delta['num_reruns']}")
    assert delta["num_recoveries"] == 1, delta
    assert delta["num_cluster_replacements"] == 0, delta  # the hung actor alone
    # Found by the heartbeat (not as a death), and blamed on the stopped actor: not on
    # a peer that waits for it.
    assert delta["hangs"] and {r for r, _ in delta["hangs"]} == {role}, delta
    assert delta["detected_s"] < HANG_TIMEOUT_S + 5, delta
    assert outs == expected


def test_rerun_keeps_grammar_and_penalties(client, offline):
    """A rerun continues a structured-output request with penalties exactly: the streamed
    tokens stay output (penalized, counted, replayed into the grammar) on the new cluster."""
    import json

    schema = {"type": "object", "required": ["text"], "additionalProperties": False,
              "properties": {"text": {"type": "string", "minLength": 120}}}
    params = SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.3,
                            frequency_penalty=0.4, min_tokens=4, json_schema=json.dumps(schema))
    prompts = _prompts(6, seed=5)
    expected = [o.token_ids for o in offline.generate(prompts, params)]
    outs, delta = asyncio.run(_kill_mid_stream(client, "decode", prompts, params=params))
    assert delta["num_recoveries"] == 1 and delta["num_reruns"] >= 1, delta
    assert outs == expected


def test_http_streams_survive_a_decode_kill(ray_cluster, client, offline):
    """Over HTTP (SSE): a decode worker killed mid-stream; every stream's text is the offline
    engine's, so no token was repeated or lost on the wire."""
    import json
    import threading

    import httpx
    from ray import serve

    from adrenaline.serve.app import build_app
    from tests.integration.serve_helpers import free_port, serve_http_port

    name = "failures-http"
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # no-op if running
    serve.run(build_app({"model": "tiny"}), name=name, route_prefix="/")
    router = serve.get_deployment_handle("Router", app_name=name)
    base = f"http://127.0.0.1:{serve_http_port()}"
    prompts = _prompts(6, seed=4)
    expected = [o.text for o in offline.generate(prompts, PARAMS)]
    texts: list[str | None] = [None] * len(prompts)
    chunks_seen = [0]

    def stream(i: int) -> None:
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": PARAMS.max_tokens,
                "temperature": 0, "stream": True}
        out = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line[6:])["choices"][0]["text"])
                    chunks_seen[0] += 1
        texts[i] = "".join(out)

    try:
        deadline = time.monotonic() + 120
        while httpx.get(base + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        pid = router.worker_pids.remote().result()["decode"][0]
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        while chunks_seen[0] < 3 * len(prompts):
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert texts == expected
        assert router.stats.remote().result()["num_recoveries"] == 1
        from tests.integration.kv_checks import assert_kv_sound

        assert_kv_sound(router, idle=True)
    finally:
        serve.delete(name)


def test_serves_normally_after_recoveries(client, offline):
    prompts = _prompts(4, seed=99)
    expected = [o.token_ids for o in offline.generate(prompts, PARAMS)]

    async def run():
        outs = await asyncio.gather(*[client.generate(p, PARAMS) for p in prompts])
        await assert_kv_sound_async(client, idle=True)
        return [o.token_ids for o in outs]

    assert asyncio.run(run()) == expected


def test_no_replacement_ends_requests_with_error_then_recovers(ray_cluster, offline):
    """A decode worker needs 1.5 of the session's 2 CPUs; a placeholder queued for them takes
    them when it dies, so no replacement can start: requests fail fast with a clear error."""
    import ray
    from ray import serve

    from adrenaline.client import Client
    from adrenaline.serve.app import build_router_app

    name = "failures-down"
    args = {"model": "tiny", "decode": {"num_cpus": 1.5},
            "recovery": {"timeout_s": 10, "retry_interval_s": 2}}
    serve.run(build_router_app(args), name=name, route_prefix=None)
    client = Client(app_name=name)
    router = serve.get_deployment_handle("Router", app_name=name)

    @ray.remote(num_cpus=1.5)
    class Placeholder:
        def ready(self) -> bool:
            return True

    async def run():
        pid = (await router.worker_pids.remote())["decode"][0]
        placeholder = Placeholder.remote()  # pending: the decode worker holds the CPUs
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        seen: list[int] = []
        task = asyncio.create_task(_stream(client, [5, 6, 7], PARAMS, seen, 0))
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        await router.hold_steps.remote("decode", 0, True)  # it cannot finish before the kill
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(Exception, match="no replacement could be started"):
            await asyncio.wait_for(task, 120)
        assert time.monotonic() - start < 90  # an error, not a hang
        with pytest.raises(Exception, match="no replacement could be started"):
            await client.generate([1, 2, 3], params)  # refused at once while down
        assert (await router.stats.remote())["state"] == "down"
        ray.kill(placeholder)  # resources come back: the next retry succeeds
        deadline = time.monotonic() + 120
        while (await router.stats.remote())["state"] != "up":
            assert time.monotonic() < deadline, "the router never came back up"
            await asyncio.sleep(0.5)
        short = SamplingParams(max_tokens=8, temperature=0)
        out = await client.generate([1, 2, 3], short)
        assert out.token_ids == offline.generate([[1, 2, 3]], short)[0].token_ids
        await assert_kv_sound_async(client, idle=True)

    try:
        asyncio.run(run())
    finally:
        serve.delete(name)
