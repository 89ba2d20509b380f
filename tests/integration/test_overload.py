"""Overload: beyond the YAML's limits the router refuses at once (429 + Retry-After), never queues
without bound; accepted requests still get exactly the offline engine's tokens; all KV is free.

Only one app may own route "/": this module deletes its app when it ends.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from adrenaline import LLM, SamplingParams
from adrenaline.errors import OverloadedError
from tests.integration.kv_checks import assert_kv_sound, assert_kv_sound_async
from tests.integration.serve_helpers import running_app

httpx = pytest.importorskip("httpx")

APP = "overload"
LIMITS = {"max_ongoing_requests": 2, "max_queued_requests": 2, "retry_after_s": 2}


@pytest.fixture(scope="module")
def http(ray_cluster):
    with running_app({"model": "tiny", "limits": LIMITS}, APP) as client:
        yield client


def _hold_stream(client, started: threading.Event, stop: threading.Event) -> None:
    """A long stream that reads its first chunk, signals, then waits for ``stop``."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                started.set()
                stop.wait(120)
                return


def test_beyond_max_ongoing_gets_429_with_retry_after(http):
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    stop = threading.Event()
    started = [threading.Event() for _ in range(LIMITS["max_ongoing_requests"])]
    threads = [threading.Thread(target=_hold_stream, args=(http, s, stop)) for s in started]
    for t in threads:
        t.start()
    try:
        for s in started:
            assert s.wait(120), "a holding stream never started"
        for stream in (False, True):
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                   "max_tokens": 2, "stream": stream})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "2"
            err = r.json()["error"]
            assert err["code"] == "overloaded" and "overloaded" in err["message"]
        assert router.stats.remote().result()["num_refused"] >= 2
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    # Capacity comes back once the held streams are gone.
    deadline = time.monotonic() + 60
    while (r := http.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                   "max_tokens": 2})).status_code == 429:
        assert time.monotonic() < deadline, "capacity never came back"
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert_kv_sound(router)


def test_burst_beyond_max_queued_refused_and_rest_exact(http):
    """A burst through the handle: some refused at the queue limit, every accepted one exact."""
    from adrenaline.client import Client

    client = Client(app_name=APP)
    prompts = [[7 + i, 100 + i, 33] for i in range(12)]
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]

    async def run():
        outs = await asyncio.gather(*[client.generate(p, params) for p in prompts],
                                    return_exceptions=True)
        await assert_kv_sound_async(client)
        return outs

    outs = asyncio.run(run())
    refused = [o for o in outs if isinstance(o, OverloadedError)]
    assert refused, "a burst of 12 against a queue limit of 2 was never refused"
    assert all(o.retry_after_s == 2 for o in refused)
    for out, exp in zip(outs, expected):
        if not isinstance(out, OverloadedError):
            assert not isinstance(out, BaseException), out
            assert out.token_ids == exp
