"""Overload: beyond the YAML's limits the app refuses at once (429 + Retry-After), never queues
without bound; accepted requests still get exactly the offline engine's tokens; all KV is free.
API keys: the app runs with keys, so every route here also checks the 401s.

Only one app may own route "/": this module deletes its app when it ends.
"""

from __future__ import annotations

import asyncio
import json
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
KEYS = ["sk-test-one", "sk-test-two"]
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def http(ray_cluster):
    with running_app({"model": "tiny", "limits": LIMITS, "api_keys": KEYS}, APP) as client:
        client.headers.update(AUTH)
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
        # The ingress's gate refused them, cheaply, before they reached the router.
        assert router.stats.remote().result()["num_refused"] == 0
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


def test_burst_of_ten_times_the_limits_gets_only_200_or_429(http):
    """150 requests at once (over 10x max_ongoing + max_queued, and more than the 2 x 66
    that Serve's queues held before the ingress had its own gate), half streamed, over
    HTTP: each is a 200 with the offline engine's exact tokens or an OpenAI-style 429 with
    Retry-After; none meets Serve's own backpressure (503)."""
    n = 150
    prompts = [[9 + i % 50, 200 + i, 31] for i in range(n)]
    expected = [o.token_ids for o in LLM("tiny").generate(
        prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]

    async def one(client, i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "stream": i % 2 == 1}
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, r.headers.get("retry-after"), r.json()
        if not body["stream"]:
            return 200, None, r.json()["choices"][0]["text"]
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
        return 200, None, "".join(json.loads(line[6:])["choices"][0]["text"]
                                  for line in r.text.splitlines()
                                  if line.startswith("data: {"))

    async def burst():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=str(http.base_url), headers=AUTH, timeout=120,
                                     limits=limits) as client:
            return await asyncio.gather(*[one(client, i) for i in range(n)])

    from adrenaline.model.tokenizer import Tokenizer
    from adrenaline.model.resolve import resolve_model_dir
    tok = Tokenizer(resolve_model_dir("tiny"))
    results = asyncio.run(burst())
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)]
    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    for (status, retry_after, out), exp in zip(results, expected):
        if status == 429:
            assert retry_after == "2" and out["error"]["type"] == "rate_limit_error", out
        else:
            assert out == tok.decode(exp)


def test_api_keys_401_in_openai_shape(http):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS[0]}):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/models")):
            r = http.request(method, path, json=body if method == "POST" else None,
                             headers={"Authorization": ""} | headers)
            assert r.status_code == 401, (path, headers, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and "sk-" not in r.text
    assert http.post("/v1/completions", json=body,
                     headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    # /health and /metrics stay open by default (open_health_metrics: true).
    assert http.get("/health", headers={"Authorization": ""}).status_code == 200
    assert http.get("/metrics", headers={"Authorization": ""}).status_code == 200
