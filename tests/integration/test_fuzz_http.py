"""Hostile input: >= 1000 generated malformed or extreme HTTP requests, none answered with a 5xx.

Hypothesis draws (derandomized, so every run sends the same requests):
- OpenAI-shaped bodies whose fields are each a plausible value, an extreme one
  (huge/negative/NaN numbers, 2**64, long or odd unicode, wrong types) or any JSON;
- raw byte bodies and truncated/corrupted JSON, with random content types.
Streaming answers are read to the end: no error event may be a server error either.
After the run the server still answers a greedy request exactly like the offline
engine, the router holds no request and every KV page is free (check_kv).

Only one app may own route "/": this module deletes its app when it ends.
"""

from __future__ import annotations

import json
import math

import pytest

from adrenaline import LLM, SamplingParams
from tests.integration.kv_checks import assert_kv_sound
from tests.integration.serve_helpers import running_app

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

APP = "fuzz"
KV_TOKENS = 256  # small pools: a valid "fill the context" request stays cheap
SENT: list[int] = []  # one entry per HTTP request sent, across the module's tests
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def http(ray_cluster):
    engine = {"kv_cache_tokens": KV_TOKENS}
    with running_app({"model": "tiny", "prefill": {"engine": engine},
                      "decode": {"engine": engine}}, APP, audit_kv=False) as client:
        yield client


# -- strategies ----------------------------------------------------------------------------

EXTREME_INTS = st.sampled_from([0, -1, -2**31, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                                10**30, -10**30])
EXTREME_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0,
                                  1e-30, 2.0000001])
ODD_TEXT = st.one_of(st.text(max_size=40), st.sampled_from([
    "", "\x00", "\ud800", "\udfff\ud800", "🦙" * 50, "\u202e\u0301" * 20, "a" * 5000,
    "<|endoftext|>", "{\"a\": 1}", "\n" * 30]))
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | EXTREME_INTS | st.floats() | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ODD_TEXT, inner, max_size=5),
    max_leaves=12)


def _field(plausible):
    """A field value: usually plausible, else extreme or any JSON at all."""
    return st.one_of(plausible, plausible, EXTREME_INTS, EXTREME_FLOATS, ANY_JSON)


TOKEN_IDS = st.lists(st.one_of(st.integers(0, 4095), EXTREME_INTS), min_size=0, max_size=30)
PROMPT = st.one_of(ODD_TEXT, TOKEN_IDS, st.lists(ODD_TEXT, max_size=3),
                   st.lists(TOKEN_IDS, max_size=2), st.just([5] * (KV_TOKENS + 10)))
MESSAGE = st.fixed_dictionaries(
    {"role": _field(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": _field(st.one_of(ODD_TEXT, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": ODD_TEXT}), max_size=3)))},
    optional={"name": _field(ODD_TEXT)})
MAX_TOKENS = st.one_of(st.integers(1, 4), st.integers(1, 4), EXTREME_INTS, EXTREME_FLOATS,
                       st.integers(KV_TOKENS - 8, KV_TOKENS + 8), st.none(), ANY_JSON)
COMMON = {
    "temperature": _field(st.sampled_from([0, 0.0, 0.7, 1, 2.5])),
    "top_p": _field(st.floats(0, 1)), "top_k": _field(st.integers(-2, 100)),
    "seed": _field(st.integers(0, 2**32)),
    "stop_token_ids": _field(TOKEN_IDS), "ignore_eos": _field(st.booleans()),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({}, optional={
        "include_usage": _field(st.booleans())})),
    "n": _field(st.integers(-1, 3)), "user": _field(ODD_TEXT),
    "stop": _field(st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=5))),
    "best_of": _field(st.integers(0, 3)), "echo": _field(st.booleans()),
    "presence_penalty": _field(st.floats(-2, 2)), "logit_bias": ANY_JSON,
    "frequency_penalty": _field(st.floats(-3, 3)), "repetition_penalty": _field(st.floats(0, 3)),
    "min_tokens": _field(st.integers(-1, 5)), "min_p": _field(st.floats(0, 1)),
    "response_format": _field(st.sampled_from([
        {"type": "text"}, {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}])),
    "unknown_field": ANY_JSON,
}
MODEL = st.one_of(st.just("tiny"), st.just("tiny"), st.just("tiny"),
                  _field(st.sampled_from(["gpt-4", "", "TINY"])))
COMPLETION = st.fixed_dictionaries(
    {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS},
    optional={**COMMON, "logprobs": _field(st.integers(-1, 25))})
CHAT = st.fixed_dictionaries(
    {"model": MODEL, "messages": _field(st.lists(MESSAGE, max_size=4)),
     "max_tokens": MAX_TOKENS},
    optional={**COMMON, "max_completion_tokens": MAX_TOKENS, "logprobs": _field(st.booleans()),
              "top_logprobs": _field(st.integers(-1, 25)), "tools": ANY_JSON,
              "tool_choice": _field(st.sampled_from(["none", "auto", "required"]))})
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"
                                 "-urlencoded", "multipart/form-data; boundary=x"])


@st.composite
def structured(draw):
    """(path, body bytes): an OpenAI-shaped body, sometimes with a required field dropped."""
    path = draw(PATHS)
    body = draw(COMPLETION if path == "/v1/completions" else CHAT)
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    return path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def raw(draw):
    """(path, body bytes, content type): bytes that are rarely valid JSON."""
    path = draw(PATHS)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        body = draw(st.binary(max_size=300))
    elif kind == 1:  # a valid-looking body cut short or with a byte flipped
        text = json.dumps(draw(COMPLETION)).encode()
        cut = draw(st.integers(0, len(text)))
        body = text[:cut] if draw(st.booleans()) else \
            text[:cut] + bytes([draw(st.integers(0, 255))]) + text[cut + 1:]
    elif kind == 2:  # deep nesting and huge literals
        depth = draw(st.integers(1, 5000))
        body = (b"[" * depth + b"]" * depth if draw(st.booleans())
                else b'{"model": "tiny", "prompt": ' + b"9" * depth + b"}")
    else:
        body = json.dumps(draw(ANY_JSON), allow_nan=True).encode("utf-8", "surrogatepass")
    return path, body, draw(CONTENT_TYPES)


# -- checks -----------------------------------------------------------------------------------

def _send(client, path: str, body: bytes, content_type: str = "application/json") -> None:
    SENT.append(1)
    headers = {"content-type": content_type} if content_type else {}
    with client.stream("POST", path, content=body, headers=headers) as r:
        content = r.read()
    assert r.status_code < 500, (r.status_code, body[:300], content[:500])
    if r.status_code != 200:
        err = json.loads(content)["error"]  # OpenAI error shape, whatever went wrong
        assert err["message"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = content.decode().split("\n\n")
        assert lines[-2] == "data: [DONE]", content[-300:]
        for line in lines[:-2]:
            event = json.loads(line.removeprefix("data: "))
            assert event.get("error", {}).get("type") != "server_error", (body[:300], event)


def test_fuzz_structured_bodies(http):
    @settings(max_examples=750, **SETTINGS)
    @given(structured())
    def run(case):
        _send(http, *case)

    run()


def test_fuzz_raw_bodies(http):
    @settings(max_examples=350, **SETTINGS)
    @given(raw())
    def run(case):
        _send(http, *case)

    run()


def test_oversized_bodies_get_413(http):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'
    SENT.append(1)
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(6):
            yield b"x" * (1 << 20)

    SENT.append(1)
    r = http.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413, r.text


def test_alive_exact_and_leak_free_after_fuzz(http):
    from ray import serve

    assert len(SENT) >= 1000, f"only {len(SENT)} fuzz requests were sent"
    assert http.get("/health").status_code == 200
    ref = LLM("tiny").generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0))[0]
    body = http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3],
                                              "max_tokens": 6, "temperature": 0}).json()
    assert body["choices"][0]["text"] == ref.text
    router = serve.get_deployment_handle("Router", app_name=APP)
    assert_kv_sound(router, idle=True, timeout_s=60)
    stats = router.stats.remote().result()
    assert stats["num_ongoing"] == 0 and stats["num_queued"] == 0, stats
