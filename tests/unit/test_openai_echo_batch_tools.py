"""Response formatting of issue 26's features (no Ray, no HTTP; the "tiny" tokenizer):
echo + logprobs, max_tokens 0 with echo, vLLM's prompt_logprobs, several prompts in one
request (indexes, usage) and tool calls cut by max_tokens."""

from __future__ import annotations

import json

import pytest

from adrenaline.protocol import TokenDelta
from adrenaline.serve.openai_api.batch import BatchResponder
from adrenaline.serve.openai_api.requests import parse_chat_request, parse_completion_request
from adrenaline.serve.openai_api.responses import make_responder
from adrenaline.serve.openai_api.tools import ToolMode, parse_complete_tool_calls
from adrenaline.serve.openai_api.utility import detokenize, tokenize


def _completion(info, tok, **fields):
    return parse_completion_request(json.dumps({"model": "tiny", "prompt": "hi", **fields})
                                    .encode(), info, tok, max_prompts=8)


def _prompt_entries(ids: list[int]) -> list:
    """Fake prompt logprobs: token i gets -i/10, and one other token (id 3) -0.01."""
    return [None] + [{t: -i / 10, 3: -0.01} for i, t in enumerate(ids[1:], start=1)]


def test_echo_logprobs_lead_with_the_prompt(tok, info):
    parsed = _completion(info, tok, prompt="abc", echo=True, logprobs=1, max_tokens=1)
    ids = parsed.request.prompt_token_ids
    assert parsed.request.params.prompt_logprobs == 1 and parsed.echo_logprobs
    r = make_responder(parsed, tok)
    r.add(TokenDelta(request_id="x", token_ids=[100], logprobs=[{100: -0.5}],
                     finish_reason="length", prompt_logprobs=_prompt_entries(ids),
                     prompt_ranks=[None] + [2] * (len(ids) - 1)))
    choice = r.response()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "abc" + tok.decode([100])
    assert len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == [-i / 10 for i in range(1, len(ids))]
    assert lp["token_logprobs"][-1] == -0.5
    # lm-eval reads token_logprobs[ctxlen:-1] and compares each with max(top_logprobs)
    assert all(max(t.values()) >= v for t, v in zip(lp["top_logprobs"][1:-1],
                                                    lp["token_logprobs"][1:-1]))
    assert lp["text_offset"][len(ids)] == len("abc")
    assert r.usage()["completion_tokens"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_with_echo_scores_the_prompt_only(tok, info, stream):
    parsed = _completion(info, tok, prompt="abcd", echo=True, logprobs=0, max_tokens=0,
                         prompt_logprobs=2)
    ids = parsed.request.prompt_token_ids
    assert parsed.echo_only and parsed.request.params.max_tokens == 1
    assert parsed.request.params.prompt_logprobs == 2
    r = make_responder(parsed, tok)
    delta = TokenDelta(request_id="x", token_ids=[1], logprobs=[{1: -0.1}], finish_reason="stop",
                       prompt_logprobs=_prompt_entries(ids),
                       prompt_ranks=[None] + [2] * (len(ids) - 1))
    if stream:
        chunk = r.chunk(delta)["choices"][0]
        text, lp, finish, plp = (chunk["text"], chunk["logprobs"], chunk["finish_reason"],
                                 chunk["prompt_logprobs"])
    else:
        r.add(delta)
        c = r.response()["choices"][0]
        text, lp, finish, plp = c["text"], c["logprobs"], c["finish_reason"], c["prompt_logprobs"]
    assert text == "abcd" and finish == "length"
    assert len(lp["tokens"]) == len(ids)  # the generated token is dropped
    assert r.usage()["completion_tokens"] == 0
    assert plp[0] is None and len(plp) == len(ids)
    assert plp[1][str(ids[1])] == {"logprob": -0.1, "rank": 2,
                                   "decoded_token": tok.decode([ids[1]])}
    assert plp[1]["3"]["rank"] == 1


def test_several_prompts_index_and_usage(tok, info):
    parsed = _completion(info, tok, prompt=["ab", "cde", "f"], n=2, max_tokens=2)
    assert isinstance(parsed, list) and len(parsed) == 3
    assert len({p.request_id for p in parsed}) == 3 and len({p.created for p in parsed}) == 1
    r = BatchResponder(parsed, tok)
    chunks = []
    for step in range(2):  # interleaved: every (prompt, choice) gets one token per step
        for i in (2, 0, 1):
            for j in (1, 0):
                chunks.append(r.chunk(i, TokenDelta(request_id="x", token_ids=[65 + i * 2 + j],
                                                    index=j,
                                                    finish_reason="length" if step else None)))
    assert r.done
    assert [c["choices"][0]["index"] for c in chunks[:6]] == [5, 4, 1, 0, 3, 2]
    assert {c["id"] for c in chunks} == {r.request_id}
    body = r.response()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["choices"][3]["text"] == tok.decode([65 + 2 + 1] * 2)
    prompt_tokens = sum(len(p.request.prompt_token_ids) for p in parsed)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                             "total_tokens": prompt_tokens + 12}


def test_complete_tool_calls_of_cut_output():
    req = ToolMode("required", ["get_weather", "get_time"])
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"name": "get_time", "parameters": {"tz": "Eur')
    assert parse_complete_tool_calls(req, text) == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert parse_complete_tool_calls(req, '[{"name": "get_wea') == []
    auto = ToolMode("auto", ["get_weather"])
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "argu')
    assert parse_complete_tool_calls(auto, text) == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert parse_complete_tool_calls(ToolMode("named", ["f"], "f"), '{"a": ') == []


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_cut_by_max_tokens(tok, info, stream):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "tool_choice": "required", "stream": stream}
    parsed = parse_chat_request(json.dumps(body).encode(), info, tok)
    out = tok.encode('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                     '{"name": "get_weather", "parameters": {"ci', add_special_tokens=False)
    r = make_responder(parsed, tok)
    chunks = []
    for k, t in enumerate(out):
        d = TokenDelta(request_id="x", token_ids=[t],
                       finish_reason="length" if k == len(out) - 1 else None)
        chunks.append(r.chunk(d)) if stream else r.add(d)
    if stream:
        chunks = [c for c in chunks if c is not None]
        assert all(c["choices"][0]["delta"].get("content", "") == "" for c in chunks)
        last = chunks[-1]["choices"][0]
        calls, finish = last["delta"]["tool_calls"], last["finish_reason"]
    else:
        choice = r.response()["choices"][0]
        assert choice["message"]["content"] is None
        calls, finish = choice["message"]["tool_calls"], choice["finish_reason"]
    assert finish == "length"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]


def test_tokenize_and_detokenize(tok, info):
    out = tokenize(json.dumps({"prompt": "hello", "return_token_strs": True}).encode(), info, tok)
    assert out["tokens"] == tok.encode("hello") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and "".join(out["token_strs"]).endswith("hello")
    chat = tokenize(json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}]}).encode(), info, tok)
    assert chat["count"] > 1 and chat["token_strs"] is None
    assert detokenize(json.dumps({"tokens": tok.encode("hello", add_special_tokens=False)})
                      .encode(), info, tok) == {"prompt": "hello"}
    from adrenaline.serve.openai_api.errors import APIError
    for bad, status in (({"prompt": "x", "model": "other"}, 404), ({}, 400),
                        ({"prompt": 5}, 400)):
        with pytest.raises(APIError) as e:
            tokenize(json.dumps(bad).encode(), info, tok)
        assert e.value.status == status
    with pytest.raises(APIError):
        detokenize(json.dumps({"tokens": [-1]}).encode(), info, tok)
