"""The OpenAI options through the official `openai` client, served with offloading on.

One app (1 prefill, 1 decode, an attention executor, static ratio 0.5: every other
request is offloaded); each test sends its requests concurrently, streaming and not,
and compares with the offline engine given the same SamplingParams (same tokens, since
every worker that samples applies the same processors). Afterwards: both local and
offloaded requests occurred, and every KV block is free (running_app's audit).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from adrenaline import LLM, SamplingParams
from adrenaline.model.tokenizer import Tokenizer
from tests.integration.serve_helpers import running_app

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

APP = "openai-options"
MODEL = "tiny"
PROMPTS = ["The llama walked", "Once upon a time in the hills"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0,
                                                 "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                          "unit": {"type": "string", "enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "Weather in a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC"]}},
             "required": ["tz"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(ray_cluster):
    args = {"model": MODEL, "prefill": {"num_instances": 1},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": 2048}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 2048}},
            "policy": "static", "policy_options": {"ratio": 0.5}}
    with running_app(args, APP) as http:
        yield http


class _LoopClient:
    """An AsyncOpenAI client per event loop (each test's asyncio.run has its own loop, and a
    client's pooled connections belong to the loop that opened them)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self._clients: dict[int, object] = {}

    def __getattr__(self, name: str):
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            self._clients = {loop: openai.AsyncOpenAI(base_url=self.base_url, api_key="unused",
                                                      max_retries=0, timeout=120)}
        return getattr(self._clients[loop], name)


@pytest.fixture(scope="module")
def api(server):
    return _LoopClient(f"{str(server.base_url).rstrip('/')}/v1")


@pytest.fixture(scope="module")
def offline():
    return LLM(MODEL)


@pytest.fixture(scope="module")
def tok(offline):
    return offline.tokenizer


def _offline_text(offline, prompt: str, **params) -> tuple[str, list[int], str]:
    out = offline.generate([prompt], SamplingParams(**params))[0]
    return out.text, out.token_ids, out.finish_reason


async def _completion(api, stream: bool, **kw) -> dict:
    """{index: (text, finish_reason)} plus "usage", streaming or not."""
    if not stream:
        r = await api.completions.create(model=MODEL, **kw)
        out = {c.index: (c.text, c.finish_reason) for c in r.choices}
        out["usage"] = r.usage.completion_tokens
        return out
    texts, finish, usage = {}, {}, None
    async for chunk in await api.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            assert c.index not in finish, "a chunk after the choice's finish_reason"
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    out = {i: (texts.get(i, ""), finish[i]) for i in finish}
    out["usage"] = usage
    return out


async def _chat(api, stream: bool, **kw) -> list[dict]:
    """Per choice: {"content", "tool_calls": [(name, arguments)], "finish_reason"}."""
    if not stream:
        r = await api.chat.completions.create(model=MODEL, **kw)
        return [{"content": c.message.content, "finish_reason": c.finish_reason,
                 "tool_calls": [(t.function.name, t.function.arguments)
                                for t in c.message.tool_calls or []]} for c in r.choices]
    acc: dict[int, dict] = {}
    async for chunk in await api.chat.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            a = acc.setdefault(c.index, {"content": "", "finish_reason": None, "calls": {}})
            a["content"] += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                call = a["calls"].setdefault(t.index, ["", ""])
                call[0] += t.function.name or ""
                call[1] += t.function.arguments or ""
            if c.finish_reason is not None:
                a["finish_reason"] = c.finish_reason
    return [{"content": a["content"] or None, "finish_reason": a["finish_reason"],
             "tool_calls": [tuple(a["calls"][k]) for k in sorted(a["calls"])]}
            for _, a in sorted(acc.items())]


def _run(*coros):
    async def main():
        return await asyncio.gather(*coros)

    return asyncio.run(main())


def _stop_window(tok: Tokenizer, ids: list[int]) -> tuple[str, int, int]:
    """A 4-character stop string spanning a token boundary, the text before its first
    occurrence, and how many tokens it takes to complete it."""
    text = tok.decode(ids)
    for i in range(len(ids) // 3, len(ids) - 1):
        b = len(tok.decode(ids[:i]))
        window = text[b - 2:b + 2]
        if b >= 2 and len(window) == 4 and window.strip() and text.find(window) == b - 2:
            need = next(j for j in range(i, len(ids) + 1) if window in tok.decode(ids[:j]))
            return window, b - 2, need
    raise AssertionError(f"no boundary-spanning window in {text!r}")


def test_stop_strings(api, offline, tok):
    cases = []
    for prompt in PROMPTS:
        text, ids, _ = _offline_text(offline, prompt, max_tokens=24, temperature=0,
                                     ignore_eos=True)
        window, cut, need = _stop_window(tok, ids)
        cases.append((prompt, window, text[:cut], need))
    calls = [_completion(api, stream, prompt=p, max_tokens=24, temperature=0,
                         stop=["@@never@@", w], extra_body={"ignore_eos": True})
             for p, w, _, _ in cases for stream in (False, True)]
    results = _run(*calls)
    for (p, w, expected, need), pair in zip(cases, zip(results[::2], results[1::2])):
        for out in pair:
            assert out[0] == (expected, "stop"), (p, w)
            assert out["usage"] == need  # up to the token that completed the stop string


def test_stop_string_in_chat_stream_never_leaks(api, offline, tok):
    msgs = [{"role": "user", "content": "hello"}]
    full = _run(_chat(api, False, messages=msgs, max_tokens=20, temperature=0,
                      extra_body={"ignore_eos": True}))[0][0]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[:full.find(stop)]
    outs = _run(*[_chat(api, s, messages=msgs, max_tokens=20, temperature=0, stop=stop,
                        extra_body={"ignore_eos": True}) for s in (False, True, True)])
    for out in outs:
        assert (out[0]["content"] or "", out[0]["finish_reason"]) == (expected, "stop")


def test_penalties_bias_min_tokens_min_p_echo(api, offline):
    p0, p1 = PROMPTS
    pen = dict(frequency_penalty=1.5, presence_penalty=0.5, max_tokens=14, temperature=0)
    rep = dict(repetition_penalty=1.4, max_tokens=14, temperature=0)
    bias = dict(logit_bias=((1, 100.0),), max_tokens=10, temperature=0)  # 1 is EOS
    minp = dict(min_p=0.3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    calls = []
    for stream in (False, True):
        calls += [
            _completion(api, stream, prompt=p0, **pen, extra_body={"ignore_eos": True}),
            _completion(api, stream, prompt=p1, max_tokens=14, temperature=0,
                        extra_body={"ignore_eos": True, "repetition_penalty": 1.4}),
            _completion(api, stream, prompt=p0, max_tokens=10, temperature=0,
                        logit_bias={"1": 100}, extra_body={"min_tokens": 4}),
            _completion(api, stream, prompt=p1, temperature=1.0, seed=11, max_tokens=12,
                        extra_body={"min_p": 0.3, "ignore_eos": True}),
            _completion(api, stream, prompt=p0, echo=True, max_tokens=6, temperature=0),
        ]
    results = _run(*calls)
    ref = [_offline_text(offline, p0, **pen, ignore_eos=True),
           _offline_text(offline, p1, **rep, ignore_eos=True),
           _offline_text(offline, p0, **bias, min_tokens=4),
           _offline_text(offline, p1, **minp),
           _offline_text(offline, p0, max_tokens=6, temperature=0)]
    assert ref[2][1][-1] == 1 and len(ref[2][1]) == 5  # EOS right after min_tokens
    assert _offline_text(offline, p0, **bias)[1] == [1]  # and at once without it
    for half in (results[:5], results[5:]):
        for k, (out, (text, ids, finish)) in enumerate(zip(half, ref)):
            expected = (p0 + text) if k == 4 else text
            assert out[0] == (expected, finish), k
            assert out["usage"] == len(ids), k


def test_n_choices(api, offline):
    p = PROMPTS[1]
    refs = [_offline_text(offline, p, max_tokens=8, temperature=1.0, seed=5 + i)
            for i in range(3)]
    assert len({r[0] for r in refs}) > 1  # the choices really differ
    outs = _run(*[_completion(api, s, prompt=p, n=3, max_tokens=8, temperature=1.0, seed=5)
                  for s in (False, True, False, True)])
    for out in outs:
        assert [out[i] for i in range(3)] == [(t, f) for t, _, f in refs]
        assert out["usage"] == sum(len(ids) for _, ids, _ in refs)
    chats = _run(*[_chat(api, s, messages=[{"role": "user", "content": "hi"}], n=2,
                         max_tokens=6, temperature=0.8, seed=1) for s in (False, True)])
    assert len(chats[0]) == 2 and chats[0] == chats[1]


def test_n_choices_with_stop_string(api, offline, tok):
    """A choice cut by a stop string ends alone; the others run on."""
    p = PROMPTS[0]
    refs = [_offline_text(offline, p, max_tokens=16, temperature=1.0, seed=40 + i,
                          ignore_eos=True) for i in range(2)]
    window, cut, _ = _stop_window(tok, refs[0][1])
    if window in refs[1][0]:
        pytest.skip("the stop string occurs in both choices")  # not with these seeds
    outs = _run(*[_completion(api, s, prompt=p, n=2, max_tokens=16, temperature=1.0, seed=40,
                              stop=[window], extra_body={"ignore_eos": True})
                  for s in (False, True)])
    for out in outs:
        assert out[0] == (refs[0][0][:cut], "stop")
        assert out[1] == (refs[1][0], "length")


def test_structured_outputs(api, offline):
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    calls = []
    for stream in (False, True):
        calls += [_chat(api, stream, messages=[{"role": "user", "content": f"q{i}"}],
                        response_format=fmt, max_tokens=40, temperature=1.0, seed=i)
                  for i in range(3)]
        calls.append(_chat(api, stream, messages=[{"role": "user", "content": "obj"}],
                           response_format={"type": "json_object"}, max_tokens=60,
                           temperature=0))
        calls.append(_completion(api, stream, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                 extra_body={"response_format": fmt}))
    results = _run(*calls)
    ref_text, _, _ = _offline_text(offline, PROMPTS[0], max_tokens=40, temperature=0,
                                   json_schema=json.dumps(SCHEMA, sort_keys=True))
    for half in (results[:5], results[5:]):
        for out in half[:3]:
            assert out[0]["finish_reason"] == "stop", out
            jsonschema.validate(json.loads(out[0]["content"]), SCHEMA)
        if half[3][0]["finish_reason"] == "stop":  # random weights may run out of tokens
            assert isinstance(json.loads(half[3][0]["content"]), dict)
        assert half[4][0] == (ref_text, "stop")
        jsonschema.validate(json.loads(ref_text), SCHEMA)


def test_tool_calls(api):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    calls = []
    for stream in (False, True):
        calls += [_chat(api, stream, messages=msgs, tools=TOOLS, tool_choice="required",
                        parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=3),
                  _chat(api, stream, messages=msgs, tools=TOOLS, tool_choice=named,
                        max_tokens=40, temperature=1.0, seed=4),
                  _chat(api, stream, messages=msgs, tools=TOOLS, tool_choice="auto",
                        max_tokens=8, temperature=0),
                  _chat(api, stream, tools=TOOLS, max_tokens=8, temperature=0, messages=msgs + [
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "call_1", "type": "function", "function": {
                              "name": "get_weather",
                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}])]
    results = _run(*calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for half in (results[:4], results[4:]):
        required, forced, auto, followup = (r[0] for r in half)
        assert required["finish_reason"] == "tool_calls" and required["content"] is None
        assert len(required["tool_calls"]) == 1  # parallel_tool_calls=False: maxItems 1
        for name, args in required["tool_calls"]:
            jsonschema.validate(json.loads(args), schemas[name])
        assert forced["finish_reason"] == "stop" and len(forced["tool_calls"]) == 1
        assert forced["tool_calls"][0][0] == "get_weather"
        jsonschema.validate(json.loads(forced["tool_calls"][0][1]), WEATHER)
        for r in (auto, followup):  # random weights write no <tool_call>: plain content
            assert r["tool_calls"] == [] and r["content"] and r["finish_reason"] == "length"
    assert results[0] == results[4] and results[1] == results[5]  # streaming == not


def test_bad_options_are_400(api):
    async def bad(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            await api.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": "x"}], max_tokens=4, **kw)
        return e.value.body

    bodies = _run(bad(response_format={"type": "json_schema", "json_schema": {
                      "name": "x", "schema": {"type": "nonsense"}}}),
                  bad(tool_choice="required"), bad(stop=["a", "b", "c", "d", "e"]),
                  bad(n=0))
    assert [b["param"] for b in bodies[1:]] == ["tool_choice", "stop", "n"]
    assert "schema" in bodies[0]["message"]


def test_both_local_and_offloaded(server, api):
    from ray import serve

    stats = serve.get_deployment_handle("Router", app_name=APP).stats.remote().result()
    assert 0 < stats["num_offloaded"] < stats["num_placed"], stats
