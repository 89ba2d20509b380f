"""The OpenAI-compatible HTTP API end to end: Serve app (1 prefill, 1 decode, "tiny") over HTTP.

Greedy results must equal the offline engine token for token; every bad input
gets the right status and an error naming the problem; afterwards the server
still serves and every KV block is free.
"""

from __future__ import annotations

import json
import time

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound
from tests.integration.serve_helpers import running_app

httpx = pytest.importorskip("httpx")

APP_NAME = "adrenaline"
DECODE_KV_TOKENS = 1024  # < max_model_len (2048): makes max_request_tokens testable
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about llamas."}]


@pytest.fixture(scope="module", params=[1, 2], ids=["1P1D", "2P1D"])
def server(request, ray_cluster):
    args = {"model": "tiny", "prefill": {"num_instances": request.param},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": DECODE_KV_TOKENS}}}
    with running_app(args, APP_NAME) as client:
        yield client


@pytest.fixture(scope="module")
def router(server):
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=APP_NAME)


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny")


def _sse(client, path: str, body: dict) -> tuple[list[dict], list[str]]:
    """POST a streaming request; (JSON events, raw data lines). Asserts the [DONE] ending."""
    events, raw = [], []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            raw.append(line[len("data: "):])
    assert raw and raw[-1] == "[DONE]"
    events = [json.loads(x) for x in raw[:-1]]
    return events, raw


def _all_kv_free(router, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = router.metrics.remote().result()
        if all(m.kv_blocks_used == 0 and m.num_running == 0 and m.num_waiting == 0
               for m in metrics):
            assert_kv_sound(router)
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still held: {metrics}")
        time.sleep(0.1)


def test_health_and_models(server):
    r = server.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = server.get("/v1/models").json()
    assert models["object"] == "list"
    [m] = models["data"]
    assert (m["id"], m["object"], m["owned_by"], m["max_model_len"]) == \
        ("tiny", "model", "adrenaline", 2048)


@pytest.mark.parametrize("prompt", ["Hello there, how are", "ids"])
def test_completion_matches_offline(server, offline, prompt):
    if prompt == "ids":
        prompt = [5, 17, 300, 42, 9, 1000]
    ref = offline.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
    assert body["usage"] == {"prompt_tokens": len(ref.prompt_token_ids),
                             "completion_tokens": len(ref.token_ids),
                             "total_tokens": len(ref.prompt_token_ids) + len(ref.token_ids)}


@pytest.mark.parametrize("prompt", ["Once upon a time", [7, 8, 9, 10, 11]])
def test_completion_stream_matches_offline(server, offline, prompt):
    ref = offline.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0]
    events, _ = _sse(server, "/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    *chunks, usage = events
    assert all(c["object"] == "text_completion" for c in events)
    assert len({c["id"] for c in events}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert usage["usage"]["completion_tokens"] == len(ref.token_ids)


def test_completion_logprobs_match_offline(server, offline):
    prompt = [4, 8, 15, 16, 23, 42]
    ref = offline.generate(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=2))[0]
    body = server.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                "max_tokens": 5, "temperature": 0,
                                                "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ref.token_ids) == len(lp["text_offset"])
    expected = [ref.logprobs[i][t] for i, t in enumerate(ref.token_ids)]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) >= 2 for top in lp["top_logprobs"])


def test_chat_matches_offline(server, offline):
    text = offline.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ref = offline.generate(text, SamplingParams(max_tokens=10, temperature=0))[0]
    r = server.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                  "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == ref.finish_reason
    assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)

    events, _ = _sse(server, "/v1/chat/completions", {
        "model": "tiny", "messages": CHAT, "max_completion_tokens": 10, "temperature": 0,
        "stream": True})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == ref.text
    assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason


def test_client_disconnect_mid_stream_frees_kv(server, router):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with server.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    _all_kv_free(router, timeout_s=30)


def test_client_timeout_non_stream_frees_kv(server, router):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json=body, timeout=1.0)  # gives up mid-generation
    _all_kv_free(router, timeout_s=30)
    assert 'adrenaline_requests_total{finish_reason="abort"}' in server.get("/metrics").text


_LONG = [5] * 3000
BAD_REQUESTS = [
    # (path, body (dict or raw bytes), status, param, needle in the message)
    ("/v1/completions", b"{not json", 400, None, "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "`prompt` is required"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "`model` is required"),
    ("/v1/completions", {"model": "tiny", "prompt": 7}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "9"}, 400, "max_tokens",
     "Expected `int | null`"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 65}, 400, "prompt",
     "limits.max_prompts_per_request"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt",
     "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": [-3]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": _LONG, "max_tokens": 1}, 400, "prompt",
     "context"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 1000, "max_tokens": 1500}, 400,
     "max_tokens", "maximum context length is 2048"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 10, "max_tokens": 1020}, 400,
     "max_tokens", f"at most {DECODE_KV_TOKENS} tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature",
     "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.01}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "`n` must be in"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True, "max_tokens": -1}, 400,
     "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of",
     "not supported"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": list("abcde")}, 400, "stop",
     "at most 4"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 300}}, 400,
     "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 3}, 400,
     "presence_penalty", "[-2, 2]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "`messages` is required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
     400, "messages[0].content", "content"),
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model", "nope"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 0}, 400,
     "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 99}, 400, "n", "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "tools": [{"x": 1}]}, 400,
     "tools[0].type", "required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, 400,
     None, "schema"),
]


@pytest.mark.parametrize("path, body, status, param, needle", BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests(server, path, body, status, param, needle, stream):
    if isinstance(body, bytes):
        r = server.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.post(path, json={**body, "stream": stream})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err


def test_still_serving_and_all_kv_free(server, router, offline):
    ref = offline.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))[0]
    body = server.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3],
                                                "max_tokens": 4, "temperature": 0}).json()
    assert body["choices"][0]["text"] == ref.text
    metrics = _all_kv_free(router)
    assert {m.role for m in metrics} == {"prefill", "decode"}
    text = server.get("/metrics").text
    assert 'adrenaline_requests_total{finish_reason="length"}' in text
    assert "adrenaline_time_to_first_token_seconds_count" in text
    assert 'adrenaline_worker_kv_blocks_used{index="0",role="decode"} 0.0' in text
    assert 'adrenaline_worker_kv_blocks_free{index="0",role="decode"}' in text
    assert 'adrenaline_worker_offloaded_requests{index="0",role="decode"} 0.0' in text
    assert 'adrenaline_worker_steps{index="0",role="decode"}' in text
