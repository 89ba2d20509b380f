"""A request's bf16 tokens do not depend on what it is batched with.

The offline engine is the reference for every distributed path, and a served
request is decoded in batches that differ from the reference's; in bfloat16 any
batch dependence of a kernel flips a greedy token sooner or later. Checked on
the real model's weights (random weights do not show it: the single-row GEMM's
other summation order changes a bf16 output only for some weights).
"""

from __future__ import annotations

import torch

from adrenaline import LLM, SamplingParams
from adrenaline.bench.serving_workloads import long_decode_requests


def _model(llm):
    return llm.engine.runner.model


def test_every_projection_gives_a_row_the_same_output_at_any_batch(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="bfloat16", num_threads=1, kv_cache_tokens=1024)
    model = _model(llm)
    layer = model.layers[16]
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, lin in [("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up),
                          ("down", layer.down), ("lm_head", model.lm_head)]:
            x = (torch.randn(128, lin.weight.shape[1]) * 0.3).to(torch.bfloat16)
            whole = lin(x)
            for m in (1, 2, 3, 16):
                parts = torch.cat([lin(x[i:i + m]) for i in range(0, 128 - 128 % m, m)])
                assert torch.equal(parts, whole[:parts.shape[0]]), f"{name} at batch {m}"


def test_greedy_tokens_alone_equal_those_in_a_batch(smollm2_dir):
    # The long-decode benchmark's first prompt parted from its batched tokens at token 65
    # when decoded alone, before single rows shared the batch kernel (model/linear.py).
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    reqs = long_decode_requests(4, 49152, 0, lambda t: tok.encode(t, add_special_tokens=False))
    prompts = [list(r.prompt) for r in reqs]
    llm = LLM(str(smollm2_dir), dtype="bfloat16", num_threads=1, enable_prefix_caching=False,
              kv_cache_tokens=4096, max_num_seqs=4)
    sp = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    alone = llm.generate(prompts[:1], [sp])[0].token_ids
    batched = llm.generate(prompts, [sp] * 4)[0].token_ids
    assert alone == batched
