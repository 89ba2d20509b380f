"""Prefill on one engine, hand the KV off, decode on another: same tokens as one engine."""

from __future__ import annotations

import random

import torch

from adrenaline import LLM, SamplingParams
from adrenaline.engine.core import EngineCore
from adrenaline.engine.request import Request
from adrenaline.config import EngineConfig

PARAMS = SamplingParams(max_tokens=10, temperature=0)


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(5, 4000) for _ in range(n)] for n in (5, 16, 17, 40)]


def test_handoff_matches_single_engine_and_pages_equal():
    expected = [o.token_ids for o in LLM("tiny").generate(_prompts(), PARAMS)]
    prefill = EngineCore("tiny", config=EngineConfig(kv_cache_tokens=512, block_size=8))
    decode = EngineCore("tiny", config=EngineConfig(kv_cache_tokens=1024, block_size=8))
    for i, p in enumerate(_prompts()):
        prefill.add_request(f"r{i}", p, PARAMS)
    done = prefill.prefill_step()
    assert len(done) == 4 and len(prefill.held) == 4
    for req in done:
        kv = prefill.export_kv(req.request_id)
        src_blocks = prefill.block_manager.block_table(req.request_id)
        prefill.release(req.request_id)
        moved = Request(req.request_id, req.prompt_token_ids, req.params, arrival=0)
        moved.token_ids = list(req.token_ids)
        moved.num_computed = req.num_computed
        decode.adopt(moved, kv)
        # The decode pages now hold exactly the prefill's pages for the computed tokens.
        dst_blocks = decode.block_manager.block_table(req.request_id)
        n = decode.block_manager.blocks_for(req.num_computed)
        for layer in range(len(decode.pool.k)):
            for cache_src, cache_dst in ((prefill.pool.k, decode.pool.k), (prefill.pool.v, decode.pool.v)):
                bd = decode.backend.block_dim
                a = cache_src[layer].index_select(bd, torch.tensor(src_blocks[:n]))
                b = cache_dst[layer].index_select(bd, torch.tensor(dst_blocks[:n]))
                assert torch.equal(a, b)
    assert prefill.block_manager.num_free_blocks == prefill.num_kv_blocks
    reqs = {r.request_id: r for r in decode.requests.values()}
    while decode.has_unfinished:
        decode.step()
    got = [reqs[f"r{i}"].output_token_ids for i in range(4)]
    assert got == expected
    assert decode.block_manager.num_free_blocks == decode.num_kv_blocks
