"""Stage attn_bw: paged decode attention's KV bytes read per second against the copy
bandwidth, on the whole device and on green-context SM partitions (an executor's share).
"""

from __future__ import annotations

import torch

from adrenaline.bench.gpu_check.common import Plan, backend_under_test, time_median


def _decode_case(plan: Plan, hq: int, hkv: int, d: int):
    """A bandwidth-sized decode step: returns (run, kv_bytes_read)."""
    from adrenaline.kernels.metadata import AttentionMetadata

    b, ctx_len, bs, dev = plan.bw_batch, plan.bw_context, 16, plan.device
    pages = -(-(ctx_len + 1) // bs)
    nb = b * pages
    perm = torch.randperm(nb).tolist()
    tables = [perm[i * pages:(i + 1) * pages] for i in range(b)]
    backend = backend_under_test(plan, hq, hkv, d, torch.bfloat16)
    shape = backend.kv_cache_shape(nb, bs)
    kc = torch.randn(shape, device=dev).to(torch.bfloat16)
    vc = torch.randn(shape, device=dev).to(torch.bfloat16)
    meta = AttentionMetadata.build(is_prefill=False, query_lens=[1] * b, context_lens=[ctx_len] * b,
                                   block_tables=tables, block_size=bs, device=dev)
    backend.prepare(meta)
    q = torch.randn(b, hq, d, device=dev).to(torch.bfloat16)
    k = torch.randn(b, hkv, d, device=dev).to(torch.bfloat16)
    v = torch.randn(b, hkv, d, device=dev).to(torch.bfloat16)
    kv_bytes = 2 * b * (ctx_len + 1) * hkv * d * 2
    return (lambda: backend.forward(q, k, v, kc, vc, meta)), kv_bytes


def stage_attn_bw(plan: Plan, ctx: dict) -> dict:
    hq, hkv, d = plan.head_shapes[0]
    run, kv_bytes = _decode_case(plan, hq, hkv, d)
    t = time_median(run, plan.device, repeats=20)
    copy = ctx.get("copy_gbs")
    out = {"shape": f"{hq}/{hkv}/{d}", "batch": plan.bw_batch, "context": plan.bw_context,
           "kv_mb": kv_bytes / 1e6, "time_us": t * 1e6, "gbs": kv_bytes / t / 1e9,
           "share_of_copy_bw": kv_bytes / t / 1e9 / copy if copy else None, "partitions": []}
    if plan.device.type != "cuda":
        out["partitions"] = "skipped (CPU)"
        return out
    from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

    total = torch.cuda.get_device_properties(plan.device).multi_processor_count
    for sms in (16, 32, 66):
        streams, resources = split_device_green_ctx_by_sm_count(plan.device, [sms])
        with torch.cuda.stream(streams[0]):
            ts = time_median(run, plan.device, repeats=10)
        got = resources[0].sm.smCount
        out["partitions"].append({"sms": got, "sm_share": got / total, "time_us": ts * 1e6,
                                  "gbs": kv_bytes / ts / 1e9, "vs_full_device": t / ts})
    return out
