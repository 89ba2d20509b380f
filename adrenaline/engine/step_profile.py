"""Timing an idle engine's decode steps and an executor's attention, on synthetic batches.

Used at start-up (actors/cluster_profile.py) for policy/profile.py's split of a
decode step into a non-attention part by batch and an attention part per KV
token. Synthetic requests (engine/synthetic_batch.py) carry random KV, so long
contexts cost no prefill; every function leaves the engine or service as it
found it (its requests aborted or freed; the free blocks back in runs, not
scattered).

Attention is timed on a batch laid out as served: contexts spread evenly up to
the long one (``served_contexts``) over a pool whose free blocks are scattered
(``scattered_free_blocks``), so the rate is what served steps pay per KV token, not
that of equal contexts in consecutive blocks (measured here with the torch
backend's decode, which gathers each sequence's blocks: 16 requests of 2,048
tokens over scattered blocks cost 1.6-1.8x per token what 8 in consecutive blocks
do).
"""

from __future__ import annotations

import time

import torch

from adrenaline.engine.synthetic_batch import (
    adopt_local,
    adopt_offloaded,
    each_context,
    scattered_free_blocks,
    served_contexts,
    service_adopt,
)

SHORT_CONTEXT = 16  # tokens: attention is negligible here, the step is its base


def _fastest_step_s(engine, steps: int) -> float:
    """The fastest of ``steps`` steps after a warm-up one: on a shared machine other work
    only ever adds time, so the minimum is the step's own cost."""
    samples = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        engine.step()
        samples.append(time.perf_counter() - start)
    return min(samples[1:])


def _abort_all(engine, reqs) -> None:
    for r in reqs:
        engine.abort(r.request_id)


def time_decode_steps(engine, batch: int, context: int | list[int], steps: int = 3
                      ) -> float | None:
    """Step seconds of ``batch`` local requests at ``context`` tokens (one for all, or one
    each; None: no room)."""
    contexts = each_context(context, batch)
    bm = engine.block_manager
    if sum(bm.blocks_for(c + steps + 2) for c in contexts) > bm.num_free_blocks or \
            batch > engine.config.max_num_seqs:
        return None
    with torch.inference_mode():
        reqs = adopt_local(engine, batch, contexts, steps + 2,
                           prefix=f"profile-{batch}-{max(contexts)}")
        try:
            return _fastest_step_s(engine, steps)
        finally:
            _abort_all(engine, reqs)


def _served_batch(free_tokens: int, num_requests: int, longest: int, block_size: int,
                  reserve: int) -> list[int]:
    """``served_contexts`` of up to ``num_requests`` requests up to ``longest`` tokens that
    a pool of ``free_tokens`` holds (``reserve`` tokens and a block of rounding each):
    fewer requests first, then shorter contexts; [] when too small to time attention."""
    n = num_requests
    while n > 1 and free_tokens // n - reserve - block_size < 4 * SHORT_CONTEXT:
        n //= 2
    # evenly spread contexts sum to about (n + 1) / 2 x the longest
    longest = min(longest, 2 * (free_tokens - n * (reserve + block_size)) // (n + 1))
    if longest < 4 * SHORT_CONTEXT:
        return []
    return served_contexts(n, longest)


def profile_decode(engine, batches: list[int], long_context: int = 2048, attn_batch: int = 16,
                   steps: int = 3) -> tuple[dict[int, float], float]:
    """(base step seconds by batch, attention seconds per KV token) of a decode engine.

    The base is a step at SHORT_CONTEXT tokens per request; the attention rate is the
    growth of a step of up to ``attn_batch`` requests from SHORT_CONTEXT to contexts laid
    out as served (module docstring), up to ``long_context``, that the pool holds.
    """
    base: dict[int, float] = {}
    for b in batches:
        t = time_decode_steps(engine, b, SHORT_CONTEXT, steps)
        if t is None:
            break
        base[b] = t
    bm = engine.block_manager
    contexts = _served_batch(bm.num_free_blocks * bm.block_size,
                             min(attn_batch, engine.config.max_num_seqs), long_context,
                             bm.block_size, steps + 2)
    if not contexts:
        raise RuntimeError(f"profile: the decode pool ({bm.num_free_blocks * bm.block_size} "
                           f"tokens) is too small to time attention")
    n = len(contexts)
    with scattered_free_blocks(bm):
        short = time_decode_steps(engine, n, SHORT_CONTEXT, steps)
        long = time_decode_steps(engine, n, contexts, steps)
    if short is None or long is None:
        raise RuntimeError(f"profile: the decode pool does not hold {n} requests of "
                           f"{contexts} tokens")
    per_token = max(long - short, 0.0) / (sum(contexts) - n * SHORT_CONTEXT)
    return base, per_token


def profile_exchange(engine, executor: int, handle: int, context: int, steps: int = 5) -> float:
    """Seconds per step a decode step waits on executor ``executor`` for one offloaded
    request (``handle`` there, ``context`` tokens): the exchange beyond the attention."""
    remote = engine.runner.remote
    with torch.inference_mode():
        reqs = adopt_offloaded(engine, [handle], context, steps + 2, executor=executor,
                               prefix=f"profile-exchange-{executor}")
        try:
            engine.step()  # warm-up
            before_s = remote.round_trip_s
            for _ in range(steps):
                engine.step()
            return (remote.round_trip_s - before_s) / steps
        finally:
            _abort_all(engine, reqs)


def profile_executor_attention(service, num_requests: int = 16, context: int = 2048,
                               repeats: int = 3) -> float:
    """Seconds of attention per KV token (all layers) on an AttentionService, by running it
    on up to ``num_requests`` requests laid out as served (module docstring), up to
    ``context`` tokens, that its free pool holds."""
    mc = service.model
    bm = service.block_manager
    free = bm.num_free_blocks * bm.block_size
    contexts = _served_batch(free, num_requests, context, bm.block_size, repeats + 2)
    if not contexts:
        raise RuntimeError(f"profile: the executor pool ({free} tokens) is too small")
    n, hq, hkv, d = len(contexts), mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    q = torch.randn(n, hq, d).to(service.dtype)
    k, v = torch.randn(n, hkv, d).to(service.dtype), torch.randn(n, hkv, d).to(service.dtype)
    best = float("inf")
    with scattered_free_blocks(bm), torch.inference_mode():
        handles = service_adopt(service, n, contexts)
        try:
            for r in range(repeats + 1):
                step = service.begin_step(handles, [c + 1 + r for c in contexts])
                start = time.perf_counter()
                for layer in range(mc.num_hidden_layers):
                    service.attend(step, layer, q, k, v)
                elapsed = time.perf_counter() - start
                if r:  # the first pass warms up
                    best = min(best, elapsed)
        finally:
            for h in handles:
                service.free(h)
    return best / sum(contexts)


# ---- whole-engine timings for the benchmarks (roofline, GPU check) ----

def profile_decode_steps(engine, batch_sizes: list[int], prompt_len: int, steps: int
                         ) -> dict[int, float]:
    """Median decode step seconds of ``engine`` (an idle EngineCore) at each batch size.

    Synthetic requests of ``prompt_len`` tokens are prefilled, timed over ``steps``
    decode steps, then aborted, so the engine is left as it was. Batch sizes the
    pool cannot hold are skipped, along with every larger one after them.
    """
    import statistics
    import time

    from adrenaline.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    per_request = engine.block_manager.blocks_for(prompt_len + steps + 2)
    times: dict[int, float] = {}
    for b in batch_sizes:
        if b * per_request > engine.num_kv_blocks:
            break
        ids = [f"profile-{b}-{i}" for i in range(b)]
        for i, rid in enumerate(ids):
            engine.add_request(rid, [10 + (7 * i + t) % 100 for t in range(prompt_len)], params)
        while engine.scheduler.waiting:
            engine.step()  # prefill
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            samples.append(time.perf_counter() - start)
        for rid in ids:
            engine.abort(rid)
        times[b] = statistics.median(samples)
    return times


def measure_copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 3, device="cpu") -> float:
    """GB/s of a large tensor copy on ``device`` (on CPU, with the calling thread's torch threads)."""
    import time

    import torch

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9  # read + write
