"""Losing the router replica loses nothing (serve/router_resume.py): kill -9 of the Router
replica's process under 16 HTTP streams (half greedy, half seeded sampled), plus a
non-streamed request and an n=2 stream. Serve starts a new replica (with a new cluster of
workers); the ingress sends each request again with the tokens it already passed on, so
every output equals the offline engine's, each token once.

The moment of the kill is forced: a worker process is stopped (SIGSTOP) first, so no
request can move on between the state the test checked and the kill: decoding (the
decode worker stopped once every stream has tokens), inside an offloaded decode step
(the executor stopped; the decode worker reports waiting on it), or in prefill (the
prefill worker stopped before the requests arrive; every one placed). The stopped worker
is killed with its router.

A router that never comes back (its model directory gone, so every new replica fails):
the streams end with an error event and no [DONE] within recovery.timeout_s plus a
margin, a non-streamed request gets 503 + Retry-After, /health answers 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest

from adrenaline import LLM, SamplingParams
from adrenaline.model.resolve import resolve_model_dir
from tests.integration.serve_helpers import running_app

APP = "routerloss"
MAX_TOKENS = 120
NUM_STREAMS = 16


@dataclass
class Spec:
    prompt: list[int]
    params: SamplingParams
    stream: bool = True


@dataclass
class Rec:
    """What one HTTP request got: text per choice, chunk times, the error, [DONE]."""

    status: int = 0
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # each content chunk's arrival
    error: dict | None = None
    error_at: float = 0.0
    done: bool = False
    request_id: str = ""
    headers: dict = field(default_factory=dict)


def _sampled(i: int) -> SamplingParams:
    if i % 2 == 0:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=50, seed=500 + i)


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


@pytest.fixture(scope="module")
def specs(offline) -> list[Spec]:
    """16 streams, then one non-streamed request and one n=2 seeded stream; prompts whose
    reference runs all MAX_TOKENS (no early EOS), so each is mid-stream at the kill."""
    rng = random.Random(27)
    out: list[Spec] = []
    while len(out) < NUM_STREAMS + 2:
        i = len(out)
        prompt = [rng.randrange(5, 4000) for _ in range(rng.randint(4, 40))]
        params = _sampled(i)
        if i == NUM_STREAMS + 1:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=50,
                                    seed=900, n=2)
        refs = [params] if params.n == 1 else [params.for_choice(c) for c in range(params.n)]
        if all(len(o.token_ids) == MAX_TOKENS for o in offline.generate([prompt] * len(refs),
                                                                       refs)):
            out.append(Spec(prompt, params, stream=i != NUM_STREAMS))
    return out


def _expected(offline, specs: list[Spec]) -> list[dict[int, str]]:
    out = []
    for s in specs:
        refs = [s.params] if s.params.n == 1 else [s.params.for_choice(c)
                                                   for c in range(s.params.n)]
        texts = [o.text for o in offline.generate([s.prompt] * len(refs), refs)]
        out.append(dict(enumerate(texts)))
    return out


@pytest.fixture(scope="module")
def app(ray_cluster):
    # Half the requests offloaded, so a kill finds both local and offloaded decodes.
    args = {"model": "tiny", "executor": {"enabled": True, "engine": {"kv_cache_tokens": 8192}},
            "policy": "static", "policy_options": {"ratio": 0.5},
            "recovery": {"timeout_s": 120, "hang_timeout_s": 120}}
    with running_app(args, APP) as client:
        yield str(client.base_url)


def router_pid(app_name: str) -> int | None:
    """The process id of the app's live Router replica (None while there is none)."""
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(f"SERVE_REPLICA::{app_name}#Router#"):
            try:
                actor = ray.get_actor(a["name"], namespace=a["namespace"])
                return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
            except Exception:
                continue  # a replica that is going away
    return None


def _named_actor(name: str):
    import ray

    (ns,) = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"] == name]
    return ray.get_actor(name, namespace=ns)


def _body(s: Spec) -> dict:
    p = s.params
    body = {"model": "tiny", "prompt": s.prompt, "max_tokens": p.max_tokens,
            "temperature": p.temperature, "n": p.n, "stream": s.stream}
    if p.seed is not None:
        body |= {"seed": p.seed, "top_k": p.top_k}
    if s.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _request(http: httpx.AsyncClient, s: Spec, rec: Rec) -> None:
    if not s.stream:
        r = await http.post("/v1/completions", json=_body(s))
        rec.status, rec.headers = r.status_code, dict(r.headers)
        data = r.json()
        if r.status_code != 200:
            rec.error, rec.error_at = data["error"], time.monotonic()
            return
        rec.request_id = data["id"]
        for ch in data["choices"]:
            rec.text[ch["index"]], rec.finish[ch["index"]] = ch["text"], ch["finish_reason"]
        rec.done = True
        return
    async with http.stream("POST", "/v1/completions", json=_body(s)) as r:
        rec.status, rec.headers = r.status_code, dict(r.headers)
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            assert not rec.done and rec.error is None, f"an event after the end: {line}"
            if data == "[DONE]":
                rec.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                rec.error, rec.error_at = event["error"], time.monotonic()
                continue
            rec.request_id = event["id"]
            for ch in event["choices"]:
                i = ch["index"]
                rec.text[i] = rec.text.get(i, "") + ch["text"]
                rec.times.append(time.monotonic())
                if ch["finish_reason"]:
                    rec.finish[i] = ch["finish_reason"]


def _freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _kill_router_when(base_url: str, specs: list[Spec], stage: str) -> tuple[list[Rec], dict]:
    """Run ``specs``; at ``stage`` ("decode" | "offloaded" | "prefill"), with the worker
    of that stage stopped, kill -9 the Router replica. Returns the records and timings."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    pids = await router.worker_pids.remote()
    before = await router.stats.remote()
    old_pid = router_pid(APP)
    frozen = {"decode": pids["decode"][0], "offloaded": pids["executor"][0],
              "prefill": pids["prefill"][0]}[stage]
    recs = [Rec() for _ in specs]
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        try:
            if stage == "prefill":
                _freeze(frozen)  # every request waits in prefill from its arrival
            tasks = [asyncio.create_task(_request(http, s, r)) for s, r in zip(specs, recs)]
            deadline = time.monotonic() + 120
            streams = [r for s, r in zip(specs, recs) if s.stream]
            if stage == "prefill":
                while (await router.stats.remote())["num_placed"] - before["num_placed"] < \
                        len(specs):
                    assert time.monotonic() < deadline, "the requests never reached prefill"
                    await asyncio.sleep(0.05)
            else:
                # Every stream decoding (past its first token, none finished), then frozen.
                while not all(len(r.times) >= 3 for r in streams):
                    assert time.monotonic() < deadline, "the streams never got going"
                    await asyncio.sleep(0.01)
                _freeze(frozen)
                if stage == "offloaded":  # the decode step in flight waits on the executor
                    decode = _named_actor(f"{APP}-decode-0")  # (the router's metrics() would
                    while (await decode.metrics.remote()).waiting_on_executor != 0:  # wait on it)
                        assert time.monotonic() < deadline, "no decode step waits on it"
                        await asyncio.sleep(0.05)
                    log = await router.admissions.remote()
                    assert sum(off for *_, off, _ in log[-len(specs) * 2:]) > 0
            assert not any(r.done or r.finish for r in recs), "a request ended before the kill"
            tokens_at_kill = [len(r.times) for r in recs]
            t_kill = time.monotonic()
            _kill(old_pid)
        finally:
            _kill(frozen)  # it dies with its router anyway; never leave it stopped
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert all(o is None for o in outs)
    new_pid = router_pid(APP)
    assert new_pid is not None and new_pid != old_pid
    # Per stream, tokens flow again at the first chunk after the kill that follows a pause
    # (chunks already on their way when the router died arrive at once).
    resumed = []
    for s, r in zip(specs, recs):
        if s.stream:
            ts = [t_kill] + [t for t in r.times if t > t_kill]
            resumed.append(next(t for prev, t in zip(ts, ts[1:]) if t - prev > 1.0) - t_kill)
    return recs, {"tokens_at_kill": tokens_at_kill, "t_kill": t_kill,
                  "first_token_after_kill_s": min(resumed), "all_flowing_s": max(resumed)}


def _check_exact(recs: list[Rec], specs: list[Spec], expected: list[dict[int, str]]) -> None:
    bad = [(i, r.status, r.error, r.done) for i, r in enumerate(recs)
           if r.status != 200 or r.error is not None or not r.done]
    assert not bad, bad
    for i, (r, s, want) in enumerate(zip(recs, specs, expected)):
        assert r.text == want, (i, r.text, want)  # each token once, none lost or changed
        assert all(r.finish[c] == "length" for c in want), (i, r.finish)


def _check_resent_once(recs: list[Rec]) -> None:
    """The new router got each request once, from the ingress (ids ``<id>~1``)."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)
    ids = {entry[0] for entry in router.admissions.remote().result()}
    for r in recs:
        assert any(i.startswith(f"{r.request_id}~1") for i in ids), (r.request_id, ids)
        assert not any(i.startswith(f"{r.request_id}~2") for i in ids), r.request_id


def _serves_after(base_url: str, offline) -> None:
    with httpx.Client(base_url=base_url, timeout=120) as http:
        assert http.get("/health").status_code == 200
        prompt = [11, 22, 33, 44]
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                               "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        want = offline.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
        assert r.json()["choices"][0]["text"] == want.text


# First in the module: its app takes the route prefix "/" that the module's `app`
# fixture holds from its first use to the module's end.
def test_a_router_that_never_comes_back_ends_streams_with_an_error(ray_cluster, offline,
                                                                    specs, tmp_path):
    """Its successor cannot start (the model directory it loads is gone): past
    recovery.timeout_s each stream ends with an error event and no [DONE], a non-streamed
    request with 503 + Retry-After; /health is 503 meanwhile."""
    timeout_s, margin_s = 10.0, 10.0
    model = tmp_path / "tiny"
    shutil.copytree(resolve_model_dir("tiny"), model)
    args = {"model": str(model), "served_model_name": "tiny",
            "recovery": {"timeout_s": timeout_s, "hang_timeout_s": 120}}
    few = specs[:4] + [specs[NUM_STREAMS]]  # 4 streams and the non-streamed request

    async def run(base_url: str) -> tuple[list[Rec], float]:
        recs = [Rec() for _ in few]
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
            tasks = [asyncio.create_task(_request(http, s, r)) for s, r in zip(few, recs)]
            while not all(len(r.times) >= 3 for s, r in zip(few, recs) if s.stream):
                await asyncio.sleep(0.01)
            model.rename(tmp_path / "gone")  # every new Router replica now fails to start
            t_kill = time.monotonic()
            _kill(router_pid(f"{APP}-gone"))
            await asyncio.sleep(1.0)
            health = await http.get("/health")
            assert health.status_code == 503 and "Retry-After" in health.headers, health.text
            await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + margin_s + 30)
            # Past the deadline a new request is refused at once.
            t0 = time.monotonic()
            r = await http.post("/v1/completions", json=_body(Spec(few[0].prompt, few[0].params,
                                                                   stream=False)))
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
            assert time.monotonic() - t0 < 5.0
        return recs, t_kill

    with running_app(args, f"{APP}-gone", audit_kv=False) as client:
        recs, t_kill = asyncio.run(run(str(client.base_url)))
    for s, r in zip(few, recs):
        assert r.error is not None and not r.done, (r.error, r.done)
        assert r.error["type"] == "server_error" and "recovery.timeout_s" in r.error["message"]
        waited = r.error_at - t_kill
        assert timeout_s - 1.0 < waited < timeout_s + margin_s, waited
        if s.stream:
            assert r.status == 200 and r.text  # it had streamed tokens, then the error
        else:
            assert r.status == 503 and int(r.headers["retry-after"]) > 0


@pytest.mark.parametrize("stage", ["decode", "offloaded", "prefill"])
def test_router_kill_loses_no_token(app, offline, specs, stage):
    expected = _expected(offline, specs)
    recs, t = asyncio.run(_kill_router_when(app, specs, stage))
    print(f"\nrouter killed ({stage}): {sum(1 for r in recs if r.done)}/{len(recs)} done; "
          f"tokens flow again after {t['first_token_after_kill_s']:.1f} s "
          f"(every stream after {t['all_flowing_s']:.1f} s)")
    _check_exact(recs, specs, expected)
    if stage != "prefill":
        assert all(n >= 3 for n, s in zip(t["tokens_at_kill"], specs) if s.stream)
    _check_resent_once(recs)
    _serves_after(app, offline)
