"""Prompt logprobs of SmolLM2 through the offline engine equal transformers' (float32).

Transformers loads the same GGUF itself; its log-softmax of the logits at position i - 1
gives prompt token i's logprob. With prefix caching on, the second prompt shares a
cached prefix with the first: its logprobs must still be complete and equal (the cache
is not read for such a request), and a later request without prompt logprobs still
hits the cache.
"""

from __future__ import annotations

import pytest
import torch

from adrenaline import LLM, SamplingParams
from tests.smollm2 import MODEL, load_hf_model

ATOL = 1e-4
TOP_K = 5
TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome, and the largest city of Spain is",
    "def add(a, b):\n    return a + b\n",
    "Hi",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return load_hf_model(smollm2_gguf)


@torch.inference_mode()
def _hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)  # row i: the distribution of token i + 1


def _check(out, hf_logp: torch.Tensor, ids: list[int]) -> None:
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row = hf_logp[i - 1]
        entry = plp[i]
        assert abs(entry[ids[i]] - float(row[ids[i]])) <= ATOL, (i, entry[ids[i]], row[ids[i]])
        top_vals, top_ids = row.topk(TOP_K)
        # The top-k set may differ only where transformers' own values tie within atol.
        for t, v in zip(top_ids.tolist(), top_vals.tolist()):
            if t in entry:
                assert abs(entry[t] - v) <= ATOL
            else:
                assert v - float(top_vals[-1]) <= ATOL, (i, t, v)
        assert len(entry) in (TOP_K, TOP_K + 1)


@pytest.mark.parametrize("caching", [False, True])
def test_prompt_logprobs_match_transformers(hf_model, caching):
    llm = LLM(MODEL, dtype="float32", enable_prefix_caching=caching, block_size=16)
    tok = llm.tokenizer
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOP_K)
    for text in TEXTS:  # one at a time: the second reuses the first's cached blocks
        ids = tok.encode(text)
        (out,) = llm.generate([ids], params)
        _check(out, _hf_prompt_logprobs(hf_model, ids), ids)
    sched = llm.engine.scheduler
    assert sched.num_cached_tokens == 0  # never read from the cache for these requests
    if caching:  # ...but they filled it: a plain request with the shared prefix hits it
        ids = tok.encode(TEXTS[1])
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0))
        assert sched.num_cached_tokens >= 16


def test_batched_prompts_each_get_their_own(hf_model):
    """Several prompts in one prefill step: each request's rows are its own."""
    llm = LLM(MODEL, dtype="float32")
    tok = llm.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1),
                                  SamplingParams(max_tokens=2, temperature=0),
                                  SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0),
                                  SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)])
    assert outs[1].prompt_logprobs is None
    for out, ids in zip(outs, prompts):
        if out.prompt_logprobs is None:
            continue
        hf = _hf_prompt_logprobs(hf_model, ids)
        for i in range(1, len(ids)):
            assert abs(out.prompt_logprobs[i][ids[i]] - float(hf[i - 1, ids[i]])) <= ATOL
    assert all(len(e) == 1 for e in outs[2].prompt_logprobs[1:])  # k = 0: the token alone
