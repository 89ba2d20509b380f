"""What evaluation harnesses and clients use, served with SmolLM2 over HTTP (issue 26):
prompt logprobs (echo + logprobs, max_tokens 0, prompt_logprobs) equal transformers'
in float32 with prefix caching on and off; the official ``openai`` client sending a list
of prompts gets each choice equal to the offline engine's greedy output; a required tool
call cut by max_tokens returns the complete first call; /tokenize, /detokenize and
/version behind the API keys."""

from __future__ import annotations

import json

import pytest
import torch

from adrenaline import LLM, SamplingParams
from tests.integration.serve_helpers import running_app, serve_http_port
from tests.smollm2 import MODEL, load_hf_model

pytest.importorskip("httpx")

KEY = "test-key-26"
ATOL = 1e-4
SHARED = ("You are a careful assistant. Answer the following question with a single word, "
          "and do not explain. Question: ")
TEXTS = [SHARED + "What color is the sky on a clear day?",
         SHARED + "Which animal says moo?",
         "1, 2, 3, 4, 5,"]


def _args(caching: bool) -> dict:
    return {"model": MODEL, "dtype": "float32", "policy": "load_aware",
            "policy_options": {"tpot_slo_ms": 10000}, "api_keys": [KEY],
            "prefill": {"num_instances": 1, "engine": {"kv_cache_tokens": 4096, "block_size": 16,
                                                       "enable_prefix_caching": caching}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": 4096}}}


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return load_hf_model(smollm2_gguf)


@pytest.fixture(scope="module")
def served(ray_cluster):
    """The app with prefix caching on (the default) and API keys."""
    with running_app(_args(True), "eval-surface") as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client


@torch.inference_mode()
def _hf_logp(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def _check_prompt_logprobs(client, hf_model, tok_ids: list[list[int]]) -> None:
    """Echo + logprobs with max_tokens 0, all prompts in one request; and vLLM's field."""
    r = client.post("/v1/completions", json={
        "model": MODEL, "prompt": tok_ids, "echo": True, "logprobs": 2, "max_tokens": 0,
        "temperature": 0, "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(len(tok_ids)))
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == sum(map(len, tok_ids))
    for ids, choice in zip(tok_ids, body["choices"]):
        hf = _hf_logp(hf_model, ids)
        lps = choice["logprobs"]["token_logprobs"]
        assert choice["finish_reason"] == "length" and len(lps) == len(ids) and lps[0] is None
        want = [float(hf[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lps[1:], want)) <= ATOL
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        for i in range(1, len(ids)):
            entry = plp[i][str(ids[i])]
            assert abs(entry["logprob"] - want[i - 1]) <= ATOL
            assert entry["rank"] == int((hf[i - 1] > hf[i - 1, ids[i]]).sum()) + 1 or abs(
                float(hf[i - 1].sort(descending=True).values[entry["rank"] - 1])
                - want[i - 1]) <= ATOL  # ranks may swap only among ties


def test_prompt_logprobs_match_transformers_cache_off(ray_cluster, smollm2_dir, hf_model):
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    with running_app(_args(False), "eval-surface-nocache") as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        _check_prompt_logprobs(client, hf_model, [tok.encode(t) for t in TEXTS])


def test_prompt_logprobs_match_transformers_cache_on(served, smollm2_dir, hf_model):
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    ids = [tok.encode(t) for t in TEXTS]
    # Warm the cache with the shared prefix: the scoring requests would hit it.
    r = served.post("/v1/completions", json={"model": MODEL, "prompt": ids[0], "max_tokens": 1})
    assert r.status_code == 200, r.text
    _check_prompt_logprobs(served, hf_model, ids)
    # ...and a plain request with that prefix does hit it (the cache is on and filled).
    metrics = served.get("/metrics").text
    hits = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("adrenaline_worker_prefix_cache_hit_tokens{")]
    r = served.post("/v1/completions", json={"model": MODEL, "prompt": ids[1], "max_tokens": 1})
    assert r.status_code == 200
    after = [float(line.split()[-1]) for line in served.get("/metrics").text.splitlines()
             if line.startswith("adrenaline_worker_prefix_cache_hit_tokens{")]
    assert sum(after) - sum(hits) >= 16


def test_openai_client_list_of_prompts_matches_offline(served):
    import openai

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "The three primary colors are"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_http_port()}/v1", api_key=KEY)
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0,
                                    n=2)
    offline = LLM(MODEL, dtype="float32")
    refs = offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert len(out.choices) == 2 * len(prompts)
    assert [c.index for c in out.choices] == list(range(2 * len(prompts)))
    for c in out.choices:
        assert c.text == refs[c.index // 2].text, c.index
    assert out.usage.completion_tokens == sum(2 * len(r.token_ids) for r in refs)
    # Streaming: chunks of all prompts interleave, each naming its index.
    texts: dict[int, str] = {}
    order = []
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=12,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            order.append(c.index)
    assert texts == {i: r.text for i, r in enumerate(refs)}
    assert order != sorted(order)  # not one prompt after another
    # Past the limit: a 400 naming it.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["x"] * 65, max_tokens=1)
    assert "max_prompts_per_request" in str(e.value)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


QUESTION = "What is the weather in Paris?"


def _tool_request(client, max_tokens: int, ban: dict, stream: bool = False,
                  logprobs: bool = False):
    return client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
        "tools": TOOLS, "tool_choice": "required", "max_tokens": max_tokens, "temperature": 0,
        "stream": stream, "logprobs": logprobs, "logit_bias": ban})


def test_required_tool_call_cut_by_max_tokens(served, smollm2_dir):
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    # SmolLM2 greedy closes the array after one call here; banning every token holding "]"
    # forces it to go on with more calls (the repeat-until-max_tokens case), so a second
    # call is there to cut.
    ban = {str(t): -100 for t in range(tok.vocab_size)
           if "]" in tok.decode([t], skip_special_tokens=False)}
    full = _tool_request(served, 60, ban, logprobs=True).json()["choices"][0]
    text = "".join(t["token"] for t in full["logprobs"]["content"])
    assert full["finish_reason"] == "length"
    assert len(full["message"]["tool_calls"]) >= 2  # every complete call, none partial
    # Where the first call's object closes, in tokens.
    first_end = next(k for k in range(1, len(full["logprobs"]["content"]) + 1)
                     if _first_call_closed(
                         "".join(t["token"] for t in full["logprobs"]["content"][:k])))
    assert len(text) > len(_first_call_text(text)) + 10, f"no second call to cut: {text!r}"
    cut = first_end + 6  # into the second call, which is far from complete
    r = _tool_request(served, cut, ban)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length", choice
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == json.loads(
        json.dumps(_first_call(text)["parameters"]))
    # Streaming: the same call in the final chunk, no content anywhere.
    events = [json.loads(line[6:]) for line in _tool_request(served, cut, ban, stream=True)
              .text.splitlines() if line.startswith("data: {")]
    assert all(not e["choices"][0]["delta"].get("content") for e in events)
    last = events[-1]["choices"][0]
    assert last["finish_reason"] == "length"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in last["delta"]["tool_calls"]] \
        == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _first_call(text: str):
    obj, _ = json.JSONDecoder().raw_decode(text, text.index("{"))
    return obj


def _first_call_text(text: str) -> str:
    at = text.index("{")
    _, end = json.JSONDecoder().raw_decode(text, at)
    return text[:end]


def _first_call_closed(text: str) -> bool:
    try:
        _first_call_text(text)
        return True
    except ValueError:
        return False


def test_tokenize_detokenize_version_behind_keys(served, smollm2_dir):
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    r = served.post("/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                       "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and len(body["token_strs"]) == body["count"]
    r = served.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(body["tokens"],
                                                                      skip_special_tokens=False)
    assert served.get("/version").json()["version"]
    for method, path, payload in (("post", "/tokenize", {"prompt": "x"}),
                                  ("post", "/detokenize", {"tokens": [1]}),
                                  ("get", "/version", None)):
        kwargs = {"json": payload} if payload is not None else {}
        r = getattr(served, method)(path, headers={"Authorization": "Bearer wrong"}, **kwargs)
        assert r.status_code == 401, (path, r.text)
