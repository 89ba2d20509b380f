"""SmolLM2-135M-Instruct served with attention offloading: over HTTP, greedy tokens equal
transformers' on the same GGUF (float32), with every request's attention on the executor
(static, ratio 1.0) and under load_aware with a decode pool too small for the batch."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from adrenaline.model.tokenizer import Tokenizer
from tests.integration.serve_helpers import running_app
from tests.smollm2 import MAX_NEW, MODEL

pytest.importorskip("httpx")

CASES = [
    ("smollm2-static", "static", {"ratio": 1.0}, 4096),
    # 256 tokens of decode KV hold ~2 of the 8 requests: load_aware must offload the rest
    # (rule d off: these short contexts cannot hide the executor's attention).
    ("smollm2-load-aware", "load_aware", {"tpot_slo_ms": 10000, "hide_remote": False}, 256),
]


def _complete(client, prompt: list[int]) -> dict:
    r = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
        "ignore_eos": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name, policy, options, decode_kv", CASES, ids=[c[0] for c in CASES])
def test_served_offloaded_greedy_matches_transformers(ray_cluster, smollm2_dir, smollm2_reference,
                                                      name, policy, options, decode_kv):
    from adrenaline.client import Client

    args = {"model": MODEL, "dtype": "float32", "policy": policy, "policy_options": options,
            "prefill": {"num_instances": 1, "engine": {"kv_cache_tokens": 4096}},
            "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "decode": {"num_instances": 1, "engine": {"kv_cache_tokens": decode_kv}}}
    tok = Tokenizer(smollm2_dir)
    with running_app(args, name) as client:
        with ThreadPoolExecutor(len(smollm2_reference)) as pool:  # all at once
            bodies = list(pool.map(lambda pe: _complete(client, pe[0]), smollm2_reference))
        metrics = asyncio.run(Client(app_name=name).metrics())
    for body, (_, expected) in zip(bodies, smollm2_reference):
        choice = body["choices"][0]
        assert body["usage"]["completion_tokens"] == MAX_NEW
        assert choice["logprobs"]["tokens"] == [tok.decode([t], skip_special_tokens=False)
                                                for t in expected]
        assert choice["text"] == tok.decode(expected)
    executor_steps = sum(m.num_steps for m in metrics if m.role == "executor")
    assert executor_steps > 0  # attention really ran on the executor
