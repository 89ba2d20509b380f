"""OpenAI-compatible parsing, validation, error JSON, SSE and detokenization (no Ray, no HTTP).

Uses the built-in "tiny" tokenizer and a hand-made ModelInfo with a short
context (64) and a smaller per-request KV limit (48) so both bounds are testable.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from adrenaline.model.resolve import resolve_model_dir
from adrenaline.errors import InvalidRequestError
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import ModelInfo, TokenDelta, WorkerMetrics
from adrenaline.serve.metrics import IngressMetrics
from adrenaline.serve.openai_api.errors import APIError, finish_error, router_error
from adrenaline.serve.openai_api.requests import parse_chat_request, parse_completion_request
from adrenaline.serve.openai_api.responses import (SSE_DONE, IncrementalDetokenizer,
                                                   make_responder, sse_error, sse_event)

MAX_MODEL_LEN = 64
MAX_REQUEST_TOKENS = 48


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(resolve_model_dir("tiny"))


@pytest.fixture(scope="module")
def info(tok) -> ModelInfo:
    return ModelInfo(name="tiny", model_dir=str(resolve_model_dir("tiny")),
                     max_model_len=MAX_MODEL_LEN, vocab_size=tok.vocab_size,
                     max_request_tokens=MAX_REQUEST_TOKENS, eos_token_ids=(1,))


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


def _completion(info, tok, **fields):
    fields.setdefault("model", "tiny")
    return parse_completion_request(_body(**fields), info, tok)


def _chat(info, tok, **fields):
    fields.setdefault("model", "tiny")
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(_body(**fields), info, tok)


def _error(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args, **kwargs)
    return e.value


# ---------------------------------------------------------------------------------------------
# /v1/completions parsing


def test_completion_text_prompt_defaults(info, tok):
    p = _completion(info, tok, prompt="hello world")
    assert p.kind == "completion" and p.model == "tiny" and not p.stream
    assert p.request.prompt_token_ids == tok.encode("hello world")
    assert p.request_id.startswith("cmpl-") and len(p.request_id) == len("cmpl-") + 32
    sp = p.request.params
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.logprobs) == \
        (16, 1.0, 1.0, -1, None, None)
    assert p.num_logprobs is None and not p.include_usage


def test_completion_prompt_forms(info, tok):
    ids = tok.encode("hello world")
    for prompt in (ids, ["hello world"], [ids]):
        assert _completion(info, tok, prompt=prompt).request.prompt_token_ids == ids
    assert _completion(info, tok, prompt="a").request_id != _completion(info, tok,
                                                                         prompt="a").request_id


def test_completion_sampling_fields(info, tok):
    p = _completion(info, tok, prompt=[5, 6], max_tokens=7, temperature=0, top_p=0.5, top_k=3,
                    seed=11, stop_token_ids=[9], ignore_eos=True, logprobs=2, stream=True,
                    stream_options={"include_usage": True}, n=1, user="someone")
    sp = p.request.params
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (7, 0.0, 0.5, 3, 11)
    assert sp.stop_token_ids == (9,) and sp.ignore_eos and sp.logprobs == 2
    assert p.stream and p.include_usage and p.num_logprobs == 2
    # include_usage without stream means nothing
    assert not _completion(info, tok, prompt=[5], stream_options={"include_usage": True}
                           ).include_usage


def test_max_tokens_null_fills_remaining_room(info, tok):
    p = _completion(info, tok, prompt=[5] * 10, max_tokens=None)
    assert p.request.params.max_tokens == MAX_REQUEST_TOKENS - 10


def test_neutral_values_of_unsupported_options_are_accepted(info, tok):
    p = _completion(info, tok, prompt=[5], echo=False, best_of=1, presence_penalty=0,
                    frequency_penalty=0.0, logit_bias={}, stop=[], suffix=None, foo=None)
    assert p.request.prompt_token_ids == [5]


@pytest.mark.parametrize("fields, status, param, needle", [
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ({"prompt": "x", "model": None}, 400, "model", "model"),
    ({"prompt": "x", "model": 3}, 400, "model", "Expected `str`"),
    ({"model": "tiny"}, 400, "prompt", "`prompt` is required"),
    ({"prompt": 5}, 400, "prompt", "prompt"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [[]]}, 400, "prompt", "empty"),
    ({"prompt": ["a"] * 65}, 400, "prompt", "the limit is 64"),
    ({"prompt": [[1, 2]] * 65}, 400, "prompt", "limits.max_prompts_per_request"),
    ({"prompt": ["a", [1]]}, 400, "prompt", "prompt"),
    ({"prompt": ["a", ""]}, 400, "prompt", "empty"),
    ({"prompt": "x", "max_tokens": 0, "echo": False}, 400, "max_tokens", "0 only with `echo`"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs", "prompt_logprobs"),
    ({"prompt": [1, "a"]}, 400, "prompt", "prompt"),
    ({"prompt": [1, True]}, 400, "prompt", "prompt"),
    ({"prompt": [1, 4096]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [-1]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "Expected `int | null`"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "max_tokens"),
    ({"prompt": [5] * 10, "max_tokens": 55}, 400, "max_tokens", "maximum context length is 64"),
    ({"prompt": [5] * 10, "max_tokens": 39}, 400, "max_tokens", "at most 48 tokens"),
    ({"prompt": [5] * 64}, 400, "prompt", "context"),
    ({"prompt": [5] * 50, "max_tokens": 1}, 400, "prompt", "at most 48"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature", "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k", "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n", "`n` must be in [1, 16]"),
    ({"prompt": "x", "n": 17}, 400, "n", "`n` must be in [1, 16]"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs", "logprobs"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "stream_options.include_usage"),
    ({"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids[0]", "stop_token_ids"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of", "`best_of` is not supported"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix", "`suffix` is not supported"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "x", "stop": 5}, 400, "stop", "stop"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", "[-2, 2]"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "(0, 2]"),
    ({"prompt": "x", "min_p": 1.5}, 400, "min_p", "[0, 1]"),
    ({"prompt": "x", "min_tokens": 17}, 400, "min_tokens", "max_tokens=16"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"5000": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format.type", "xml"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema", "required"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "`frobnicate` is not supported"),
])
def test_completion_errors(info, tok, fields, status, param, needle):
    err = _error(_completion, info, tok, **fields)
    assert (err.status, err.param) == (status, param), err.message
    assert needle in err.message
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


def test_malformed_and_non_object_bodies(info, tok):
    for raw in (b"{not json", b"", b'{"model": "tiny", "prompt": "x"'):
        err = _error(parse_completion_request, raw, info, tok)
        assert err.status == 400 and "malformed JSON" in err.message
    err = _error(parse_completion_request, b"[1, 2]", info, tok)
    assert err.status == 400 and "JSON object" in err.message


def test_error_codes(info, tok):
    assert _error(_completion, info, tok, prompt="x", model="nope").code == "model_not_found"
    assert _error(_completion, info, tok, prompt=[5] * 64).code == "context_length_exceeded"


def test_text_prompt_without_tokenizer(info):
    err = _error(parse_completion_request, _body(model="tiny", prompt="hi"), info, None)
    assert err.status == 400 and "tokenizer" in err.message and err.param == "prompt"
    p = parse_completion_request(_body(model="tiny", prompt=[3, 4]), info, None)
    assert p.request.prompt_token_ids == [3, 4]
    err = _error(parse_chat_request, _body(model="tiny", messages=[
        {"role": "user", "content": "hi"}]), info, None)
    assert err.status == 400 and "tokenizer" in err.message


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions parsing


def test_chat_prompt_is_template_then_encode(info, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    p = _chat(info, tok, messages=msgs, max_tokens=5)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert p.request.prompt_token_ids == tok.encode(text)
    assert p.kind == "chat" and p.request_id.startswith("chatcmpl-")
    assert p.request.params.max_tokens == 5 and p.num_logprobs is None


def test_chat_content_parts_and_max_tokens(info, tok):
    a = _chat(info, tok, messages=[{"role": "user", "content": [
        {"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}])
    b = _chat(info, tok)
    assert a.request.prompt_token_ids == b.request.prompt_token_ids
    n = len(b.request.prompt_token_ids)
    assert b.request.params.max_tokens == MAX_REQUEST_TOKENS - n  # default: all the room left
    c = _chat(info, tok, max_tokens=3, max_completion_tokens=4)
    assert c.request.params.max_tokens == 4  # max_completion_tokens wins


def test_chat_logprobs(info, tok):
    p = _chat(info, tok, logprobs=True, top_logprobs=3)
    assert p.num_logprobs == 3 and p.request.params.logprobs == 3
    assert _chat(info, tok, logprobs=True).num_logprobs == 0
    assert _chat(info, tok, logprobs=False, top_logprobs=0).num_logprobs is None


@pytest.mark.parametrize("fields, param, needle", [
    ({"messages": []}, "messages", "empty"),
    ({"messages": None}, "messages", "messages"),
    ({"messages": "hi"}, "messages", "Expected `array`"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "`messages[0].content` is required"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "required"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "only text"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens"),
    ({"max_tokens": 60}, "max_tokens", "maximum context length"),
    ({"messages": [{"role": "user", "content": "word " * 80}]}, "messages", "context"),
    ({"logprobs": 3}, "logprobs", "Expected `bool | null`"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs", "needs `logprobs`"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"top_p": 2}, "top_p", "top_p"),
    ({"n": 30}, "n", "`n` must be in"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "required"),
    ({"tools": [{"type": "x", "function": {"name": "f"}}]}, "tools[0].type", "function"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice", "sometimes"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "'g'"),
    ({"messages": [{"role": "tool", "content": "3"}]}, "messages[0].tool_call_id", "required"),
    ({"functions": [{"name": "f"}]}, "functions", "use `tools`"),
])
def test_chat_errors(info, tok, fields, param, needle):
    err = _error(_chat, info, tok, **fields)
    assert (err.status, err.param) == (400, param), err.message
    assert needle in err.message


def test_chat_unknown_model_is_404(info, tok):
    err = _error(_chat, info, tok, model="other")
    assert err.status == 404 and err.param == "model" and "other" in err.message


# ---------------------------------------------------------------------------------------------
# Errors from the router


class _FakeRayTaskError(InvalidRequestError):
    """What Ray raises for a remote InvalidRequestError: a subclass, the original as cause."""

    def __init__(self, cause: BaseException):
        super().__init__(f"ray::Router.generate()\n  File x\n{type(cause).__name__}: {cause}")
        self.cause = cause


def test_router_error_mapping():
    err = router_error(_FakeRayTaskError(InvalidRequestError("prompt is too long")))
    assert err.status == 400 and err.message == "prompt is too long"
    assert router_error(InvalidRequestError("bad")).message == "bad"
    err = router_error(RuntimeError("actor died"))
    assert err.status == 500 and err.type == "server_error" and "actor died" in err.message


def test_router_error_from_real_ray_task_error():
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("Router.generate", "Traceback ...\nInvalidRequestError: too long",
                           InvalidRequestError("too long")).as_instanceof_cause()
    assert isinstance(wrapped, InvalidRequestError)
    err = router_error(wrapped)
    assert (err.status, err.message) == (400, "too long")


def test_finish_error():
    d = TokenDelta(request_id="r", token_ids=[], finish_reason="error", error="worker crashed")
    err = finish_error(d)
    assert err.status == 500 and "worker crashed" in err.message
    assert finish_error(TokenDelta(request_id="r", token_ids=[], finish_reason="abort")
                        ).status == 503
    assert finish_error(TokenDelta(request_id="r", token_ids=[3], finish_reason="stop")) is None
    assert finish_error(TokenDelta(request_id="r", token_ids=[3])) is None


# ---------------------------------------------------------------------------------------------
# Detokenization


def test_incremental_detokenizer_holds_back_partial_utf8(tok):
    text = "héllo ✓ 日本 done"
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # some tokens are partial chars
    d = IncrementalDetokenizer(tok)
    pieces = [d.add([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.finish() == tok.decode(ids) == text


def test_incremental_detokenizer_flushes_incomplete_tail(tok):
    ids = tok.encode("日")  # BOS + 3 byte tokens
    d = IncrementalDetokenizer(tok)
    out = d.add(ids[:-1])  # an incomplete character: held back
    assert out == ""
    assert d.finish() == tok.decode(ids[:-1]) and "\ufffd" in d.emitted
    assert IncrementalDetokenizer(None).add([1, 2]) == ""


# ---------------------------------------------------------------------------------------------
# Response formatting


def _char_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per (ASCII) character, so per-token offsets are predictable."""
    ids = [tok.encode(c, add_special_tokens=False) for c in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


def _deltas(ids: list[int], reason: str = "length", logprobs: bool = False) -> list[TokenDelta]:
    out = []
    for k, t in enumerate(ids):
        lp = [{t: -0.5, 7: -1.0, 8: -2.0}] if logprobs else None
        out.append(TokenDelta(request_id="x", token_ids=[t], logprobs=lp,
                              finish_reason=reason if k == len(ids) - 1 else None))
    return out


def test_completion_response_shape(info, tok):
    p = _completion(info, tok, prompt="hello", max_tokens=4)
    gen = tok.encode("héllo ✓", add_special_tokens=False)
    r = make_responder(p, tok)
    for d in _deltas(gen):
        r.add(d)
    body = r.response()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["id"] == p.request_id
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "héllo ✓", "logprobs": None,
                                "finish_reason": "length"}]
    n_prompt = len(tok.encode("hello"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(gen),
                             "total_tokens": n_prompt + len(gen)}


def test_completion_logprobs_shape(info, tok):
    p = _completion(info, tok, prompt="hello", logprobs=2)
    gen = _char_ids(tok, "ab")
    r = make_responder(p, tok)
    for d in _deltas(gen, logprobs=True):
        r.add(d)
    lp = r.response()["choices"][0]["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in gen]
    assert lp["token_logprobs"] == [-0.5] * len(gen)
    assert lp["text_offset"] == [0, 1]
    top = lp["top_logprobs"][0]
    assert list(top.values()) == [-0.5, -1.0, -2.0]  # by decreasing logprob


def test_completion_stream_chunks(info, tok):
    p = _completion(info, tok, prompt="hello", stream=True, stream_options={"include_usage": True})
    gen = tok.encode("日本 ok", add_special_tokens=False)
    r = make_responder(p, tok)
    chunks = [c for d in _deltas(gen, reason="stop") if (c := r.chunk(d)) is not None]
    assert len(chunks) < len(gen)  # partial characters produced no chunk
    assert "".join(c["choices"][0]["text"] for c in chunks) == "日本 ok"
    assert all(c["object"] == "text_completion" and c["id"] == p.request_id for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["usage"] is None for c in chunks)
    u = r.usage_chunk()
    assert u["choices"] == [] and u["usage"]["completion_tokens"] == len(gen)


def test_completion_stream_logprob_offsets(info, tok):
    p = _completion(info, tok, prompt="hello", stream=True, logprobs=1)
    gen = _char_ids(tok, "abc")
    r = make_responder(p, tok)
    offsets = [r.chunk(d)["choices"][0]["logprobs"]["text_offset"] for d in _deltas(gen)]
    assert offsets == [[0], [1], [2]]


def test_chat_response_and_stream(info, tok):
    p = _chat(info, tok, max_tokens=8)
    gen = tok.encode("Hi there ✓", add_special_tokens=False) + [1]  # ends with EOS
    r = make_responder(p, tok)
    for d in _deltas(gen, reason="stop"):
        r.add(d)
    body = r.response()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                        "content": "Hi there ✓"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == len(gen)

    p = _chat(info, tok, max_tokens=8, stream=True)
    r = make_responder(p, tok)
    chunks = [c for d in _deltas(gen, reason="stop") if (c := r.chunk(d)) is not None]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hi there ✓"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[0]


def test_chat_single_final_delta_carries_role(info, tok):
    p = _chat(info, tok, max_tokens=1, stream=True)
    r = make_responder(p, tok)
    c = r.chunk(TokenDelta(request_id="x", token_ids=[74], finish_reason="length"))
    assert c["choices"][0]["delta"] == {"role": "assistant", "content": tok.decode([74])}
    assert c["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_shape(info, tok):
    p = _chat(info, tok, logprobs=True, top_logprobs=2)
    gen = _char_ids(tok, "ab")
    r = make_responder(p, tok)
    for d in _deltas(gen, logprobs=True):
        r.add(d)
    content = r.response()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    first = content[0]
    assert first["token"] == "a" and first["logprob"] == -0.5 and first["bytes"] == [97]
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5, -1.0]  # top 2 only


def test_sse_framing():
    assert sse_event({"a": 1}) == b'data: {"a":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    ev = sse_error(APIError(500, "boom"))
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    payload = msgspec.json.decode(ev[len(b"data: "):])
    assert payload == {"error": {"message": "boom", "type": "server_error", "param": None,
                                 "code": None}}


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_tracker_and_worker_gauges():
    m = IngressMetrics()
    t = m.track(10, start=0.0)
    t.tokens(1)
    t.tokens(3)
    t.finish("length")
    t.finish("length")  # idempotent
    m.track(5).finish("abort")
    m.set_workers([WorkerMetrics(role="decode", index=0, num_running=2, num_waiting=1,
                                 kv_blocks_used=3, kv_blocks_total=10)])
    text = m.render().decode()
    assert 'adrenaline_requests_total{finish_reason="length"} 1.0' in text
    assert 'adrenaline_requests_total{finish_reason="abort"} 1.0' in text
    assert "adrenaline_prompt_tokens_total 15.0" in text
    assert "adrenaline_generation_tokens_total 4.0" in text
    assert "adrenaline_time_to_first_token_seconds_count 1.0" in text
    assert "adrenaline_time_per_output_token_seconds_count 1.0" in text
    assert "adrenaline_e2e_request_latency_seconds_count 1.0" in text
    assert 'adrenaline_worker_kv_blocks_free{index="0",role="decode"} 7.0' in text
    assert 'adrenaline_worker_running_requests{index="0",role="decode"} 2.0' in text
    m.set_workers(None)
    assert "adrenaline_worker_kv_blocks_free{" not in m.render().decode()


# ---------------------------------------------------------------------------------------------
# The ingress's stream loop with a fake router stream (no Ray cluster)


class _FakeStream:
    def __init__(self, deltas: list[TokenDelta]):
        self._deltas = list(deltas)
        self.closed = False

    async def next(self) -> TokenDelta:
        return self._deltas.pop(0)

    def close(self) -> None:
        self.closed = True


def _ingress(tok):
    from adrenaline.serve.ingress import Ingress

    # Our class, not Serve's ASGI wrapper subclass (whose async __del__ warns when collected).
    cls = next(c for c in Ingress.func_or_class.__mro__ if "_sse" in c.__dict__)
    obj = object.__new__(cls)
    obj._tokenizer = tok
    return obj


def _run_sse(ingress, parsed, deltas) -> tuple[list[bytes], _FakeStream]:
    import asyncio

    stream = _FakeStream(deltas[1:])

    async def collect():
        return [ev async for ev in ingress._sse(parsed, stream, deltas[0])]

    return asyncio.run(collect()), stream


def test_ingress_sse_error_event_ends_the_stream_without_done(info, tok):
    parsed = _completion(info, tok, prompt="hello", stream=True,
                         stream_options={"include_usage": True})
    deltas = [TokenDelta(request_id="x", token_ids=[74]),
              TokenDelta(request_id="x", token_ids=[], finish_reason="error", error="boom")]
    events, stream = _run_sse(_ingress(tok), parsed, deltas)
    assert SSE_DONE not in events and stream.closed  # [DONE] stands for a complete answer
    assert json.loads(events[0][6:])["choices"][0]["text"] == tok.decode([74])
    err = json.loads(events[1][6:])["error"]
    assert "boom" in err["message"] and err["type"] == "server_error"
    assert len(events) == 2  # no usage chunk after an error


def test_ingress_sse_usage_then_done_and_complete_error(info, tok):
    import asyncio

    parsed = _chat(info, tok, stream=True, stream_options={"include_usage": True})
    deltas = _deltas(_char_ids(tok, "ab"), reason="stop")
    events, stream = _run_sse(_ingress(tok), parsed, deltas)
    assert events[-1] == SSE_DONE and stream.closed
    usage_chunk = json.loads(events[-2][6:])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 2

    parsed = _completion(info, tok, prompt="hello")
    bad = TokenDelta(request_id="x", token_ids=[], finish_reason="error", error="worker died")
    with pytest.raises(APIError) as e:
        asyncio.run(_ingress(tok)._complete(parsed, _FakeStream([bad]),
                                            TokenDelta(request_id="x", token_ids=[74])))
    assert e.value.status == 500 and "worker died" in e.value.message


def test_overload_errors_map_to_429_and_503_with_retry_after():
    from adrenaline.errors import OverloadedError, ServiceUnavailableError
    from adrenaline.serve.openai_api.errors import router_error

    err = router_error(OverloadedError("busy", retry_after_s=2.5))
    assert err.status == 429 and err.headers == {"Retry-After": "3"}
    assert err.body()["error"]["code"] == "overloaded"
    assert err.body()["error"]["type"] == "rate_limit_error"
    err = router_error(ServiceUnavailableError("decode worker 0 died"))
    assert err.status == 503 and "Retry-After" in err.headers
    assert "decode worker 0 died" in err.body()["error"]["message"]


def test_deeply_nested_json_is_a_400_not_a_crash():
    from adrenaline.serve.openai_api.errors import APIError
    from adrenaline.serve.openai_api.requests import parse_completion_request

    with pytest.raises(APIError) as e:
        parse_completion_request(b"[" * 5000 + b"]" * 5000, None, None)
    assert e.value.status == 400 and "nested too deeply" in e.value.message


@pytest.mark.parametrize("body", [b'{"\x80odel": "tiny"}', b'{"model": "\xed\xa0\x80"}'])
def test_invalid_utf8_is_a_400(body):
    from adrenaline.serve.openai_api.errors import APIError
    from adrenaline.serve.openai_api.requests import parse_completion_request

    with pytest.raises(APIError) as e:
        parse_completion_request(body, None, None)
    assert e.value.status == 400 and "UTF-8" in e.value.message
