"""Choices in responses: stop strings (cut, held-back tail), n choices, echo, tool calls
(no Ray, no HTTP; the built-in "tiny" tokenizer, byte-level, encodes any text)."""

from __future__ import annotations

import json

import pytest

from adrenaline.protocol import TokenDelta
from adrenaline.serve.openai_api.requests import parse_chat_request, parse_completion_request
from adrenaline.serve.openai_api.responses import held_suffix, make_responder


def _completion(info, tok, **fields):
    return parse_completion_request(json.dumps({"model": "tiny", "prompt": "hi", **fields})
                                    .encode(), info, tok)


def _chat(info, tok, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(json.dumps(body).encode(), info, tok)


def _stream(responder, ids: list[int], index: int = 0, finish: str = "length") -> list[dict]:
    """Feed ids one token per delta (the last one finishing); the chunks sent."""
    chunks = []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        chunk = responder.chunk(TokenDelta(request_id="r", token_ids=[t], index=index,
                                           finish_reason=finish if last else None))
        if chunk is not None:
            chunks.append(chunk)
        if responder.choices[index].finished:
            break
    return chunks


def test_held_suffix():
    assert held_suffix("abc ST", ["STOP"]) == 2
    assert held_suffix("abc S", ["STOP", "SX"]) == 1
    assert held_suffix("abc", ["STOP"]) == 0
    assert held_suffix("STOP", ["STOP"]) == 0  # a whole match is not a tail


def test_stop_string_across_tokens_never_streams_past_it(tok, info):
    text = "alpha beta END gamma delta"
    ids = tok.encode(text, add_special_tokens=False)
    parsed = _completion(info, tok, stop=["END", "never"], stream=True)
    r = make_responder(parsed, tok)
    sent = ""
    for chunk in _stream(r, ids):
        sent += chunk["choices"][0]["text"]
        assert "alpha beta ".startswith(sent), sent  # never a character of "END" or past it
    assert sent == "alpha beta "
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.stopped_early
    # Tokens up to the one completing "END", no more.
    need = next(j for j in range(1, len(ids) + 1) if "END" in tok.decode(ids[:j]))
    assert len(c.token_ids) == need
    assert r.usage()["completion_tokens"] == need


def test_stop_string_not_before_min_tokens(tok, info):
    ids = tok.encode("ab ab ab ab", add_special_tokens=False)

    def text(**fields) -> str:
        r = make_responder(_completion(info, tok, stop="ab", max_tokens=len(ids) + 4, **fields),
                           tok)
        for k, t in enumerate(ids):
            r.add(TokenDelta(request_id="r", token_ids=[t],
                             finish_reason="length" if k == len(ids) - 1 else None))
        return r.response()["choices"][0]["text"]

    assert text() == ""
    assert text(min_tokens=len(ids) + 1) == "ab ab ab ab"  # checked from min_tokens on (vLLM)


def test_n_choices_echo_and_usage(tok, info):
    parsed = _completion(info, tok, n=2, echo=True, prompt="Say: ")
    r = make_responder(parsed, tok)
    a, b = tok.encode("one two", add_special_tokens=False), tok.encode("three",
                                                                         add_special_tokens=False)
    r.add(TokenDelta(request_id="r", token_ids=b, index=1, finish_reason="stop"))
    assert not r.done
    r.add(TokenDelta(request_id="r", token_ids=a, index=0, finish_reason="length"))
    body = r.response()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Say: one two", "length"), (1, "Say: three", "stop")]
    assert body["usage"]["completion_tokens"] == len(a) + len(b)


def test_auto_tool_call_is_parsed_and_held_back(tok, info):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    text = 'Let me check. <tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    ids = tok.encode(text, add_special_tokens=False)
    r = make_responder(_chat(info, tok, tools=tools, stream=True), tok)
    chunks = _stream(r, ids, finish="stop")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "Let me check. "  # the call's text never streams as content
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    (call,) = last["delta"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and call["index"] == 0
    assert json.loads(call["function"]["arguments"]) == {"tz": "UTC"}


def test_required_and_named_tool_calls(tok, info):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    req = _chat(info, tok, tools=tools, tool_choice="required")
    schema = json.loads(req.request.params.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    r = make_responder(req, tok)
    r.add(TokenDelta(request_id="r", token_ids=tok.encode('[{"name": "f", "parameters": {"x": 2}}]',
                                                          add_special_tokens=False),
                     finish_reason="stop"))
    msg = r.response()["choices"][0]
    assert msg["finish_reason"] == "tool_calls" and msg["message"]["content"] is None
    assert msg["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                           "arguments": '{"x": 2}'}
    named = _chat(info, tok, tools=tools, tool_choice={"type": "function",
                                                       "function": {"name": "f"}})
    assert json.loads(named.request.params.json_schema) == tools[0]["function"]["parameters"]
    r = make_responder(named, tok)
    r.add(TokenDelta(request_id="r", token_ids=tok.encode('{"x": 5}', add_special_tokens=False),
                     finish_reason="stop"))
    msg = r.response()["choices"][0]
    assert msg["finish_reason"] == "stop"
    assert msg["message"]["tool_calls"][0]["function"]["arguments"] == '{"x": 5}'


def test_tools_reach_the_prompt_and_tool_messages_are_accepted(tok, info):
    tools = [{"type": "function", "function": {"name": "lookup_weather", "parameters": {}}}]
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "lookup_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    ids = _chat(info, tok, tools=tools, messages=msgs).request.prompt_token_ids
    text = tok.decode(ids)
    assert "lookup_weather" in text and "sunny" in text and "<|tool|>" in text
    none = _chat(info, tok, tools=tools, tool_choice="none").request.prompt_token_ids
    assert "lookup_weather" not in tok.decode(none)


def test_json_response_formats(tok, info):
    assert json.loads(_chat(info, tok, response_format={"type": "json_object"})
                      .request.params.json_schema) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    p = _completion(info, tok, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}})
    assert json.loads(p.request.params.json_schema) == schema
    assert _chat(info, tok, response_format={"type": "text"}).request.params.json_schema is None
