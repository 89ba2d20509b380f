"""Decode batches with synthetic KV, for profiles and benchmarks that must not prefill.

A request here looks exactly like one handed off by a prefill instance
(prompt + first token, ``num_computed`` tokens of KV), but its KV is random
values written straight into the pool: a 2,048-token context costs a tensor
fill instead of a prefill. Step times do not depend on the KV's values, so
timings taken on these batches are those of real ones.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch

from adrenaline.engine.kv_transfer import kv_export_shape
from adrenaline.engine.request import Request
from adrenaline.sampling_params import SamplingParams


def synthetic_kv(pool, block_dim: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Random KV for ``num_blocks`` blocks in ``pool``'s layout and dtype."""
    shape = kv_export_shape(pool, block_dim, num_blocks)
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(shape, generator=g)).to(pool.k[0].dtype)


def synthetic_request(engine, request_id: str, context_len: int, max_tokens: int,
                      seed: int = 0) -> Request:
    """A decode-ready request with ``context_len`` tokens of context (not yet adopted)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompt = [10 + (seed * 31 + t) % 1000 for t in range(context_len)]
    r = Request(request_id, prompt, params, arrival=0,
                eos_token_ids=engine.model_config.eos_token_ids,
                max_model_len=engine.max_model_len)
    r.token_ids.append(11)  # the "first token" a prefill would have sampled
    r.num_computed = context_len
    return r


def each_context(context_len: int | list[int], n: int) -> list[int]:
    """Per-request contexts: ``context_len`` itself (one each), or it ``n`` times."""
    return context_len if isinstance(context_len, list) else [context_len] * n


def served_contexts(n: int, longest: int) -> list[int]:
    """Contexts of a steady-state decode batch of ``n`` requests: evenly spread up to
    ``longest`` (a served batch holds requests at every stage of their lives)."""
    return [max(longest * (i + 1) // n, 1) for i in range(n)]


@contextmanager
def scattered_free_blocks(block_manager, seed: int = 0):
    """Within: the free list in a seeded random order, the order a served pool's churn
    leaves it; on exit: back in its order before. Start-up profiles only (a pool with no
    cached blocks).

    A served sequence's blocks are scattered over the pool (decode growth takes a block
    at a time, interleaved with every other sequence's), and reading scattered blocks is
    slower than reading a fresh pool's consecutive ones.
    """
    before = _refree(block_manager, lambda blocks: random.Random(seed).sample(blocks, len(blocks)))
    try:
        yield
    finally:
        rank = {b: i for i, b in enumerate(before)}
        _refree(block_manager, lambda blocks: sorted(blocks, key=lambda b: rank.get(b, len(rank))))


def _refree(block_manager, order) -> list[int]:
    """Take every free block (as one-block sequences), then free them in
    ``order(blocks)``; returns the blocks in the free list's order before. Public API only."""
    seq_of = {}
    for i in range(block_manager.num_free_blocks):
        seq_of[block_manager.allocate(f"scatter-{i}", 1)[0]] = f"scatter-{i}"
    before = list(seq_of)
    for b in order(list(before)):
        block_manager.free(seq_of[b])
    return before


def adopt_local(engine, n: int, context_len: int | list[int], max_tokens: int,
                prefix: str = "synthetic") -> list[Request]:
    """Adopt ``n`` synthetic requests whose KV lives in ``engine``'s own pool (contexts:
    one for all, or one each)."""
    contexts = each_context(context_len, n)
    reqs = []
    for i, context_len in enumerate(contexts):
        r = synthetic_request(engine, f"{prefix}-{i}", context_len, max_tokens, seed=i)
        kv = synthetic_kv(engine.pool, engine.backend.block_dim,
                          engine.block_manager.blocks_for(context_len), seed=i)
        engine.adopt(r, kv)
        reqs.append(r)
    return reqs


def adopt_offloaded(engine, handles: list[int], context_len: int, max_tokens: int,
                    executor: int = 0, prefix: str = "synthetic-off") -> list[Request]:
    """Adopt requests whose KV an executor holds under ``handles`` (see ``service_adopt``)."""
    reqs = []
    for i, h in enumerate(handles):
        r = synthetic_request(engine, f"{prefix}-{i}", context_len, max_tokens, seed=1000 + i)
        r.executor, r.remote_handle = executor, h
        engine.adopt(r, None)
        reqs.append(r)
    return reqs


def service_adopt(service, n: int, context_len: int | list[int]) -> list[int]:
    """Give an AttentionService ``n`` synthetic requests (contexts: one for all, or one
    each); their handles."""
    contexts = each_context(context_len, n)
    bm = service.block_manager
    return [service.adopt(f"synthetic-off-{i}", c + 1, c,
                          synthetic_kv(service.pool, service.backend.block_dim, bm.blocks_for(c),
                                       1000 + i))
            for i, c in enumerate(contexts)]
