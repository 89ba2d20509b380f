"""Stage kernels: the backend under test against the torch backend in float32 (decode,
prefill with cached context, KV append) for several head shapes, and the fused
elementwise ops against TorchOps.
"""

from __future__ import annotations

import random

import torch

from adrenaline.bench.gpu_check.common import Plan, backend_under_test, sync


def _to_backend_layout(backend, slots: torch.Tensor, num_blocks: int, bs: int) -> torch.Tensor:
    """Logical per-slot KV [NB*bs, Hkv, D] -> the backend's page layout (torch or NHD)."""
    hkv, d = slots.shape[1], slots.shape[2]
    paged = slots.view(num_blocks, bs, hkv, d)
    shape = tuple(backend.kv_cache_shape(num_blocks, bs))
    if shape == (num_blocks, bs, hkv, d):
        return paged.clone()  # a copy: the check compares it against ``slots`` afterwards
    assert shape == (hkv, num_blocks, bs, d), f"unknown page layout {shape}"
    return paged.permute(2, 0, 1, 3).contiguous()


def _to_logical(backend, cache: torch.Tensor, num_blocks: int, bs: int) -> torch.Tensor:
    if cache.shape[0] == num_blocks and cache.shape[1] == bs:
        return cache.reshape(num_blocks * bs, cache.shape[2], cache.shape[3])
    return cache.permute(1, 2, 0, 3).reshape(num_blocks * bs, cache.shape[0], cache.shape[3])


def _scenario(specs: list[tuple[int, int]], bs: int, rng: random.Random):
    """Disjoint shuffled block tables for (context, query) sequences; returns tables, num_blocks."""
    need = [-(-(c + q) // bs) for c, q in specs]
    num_blocks = sum(need) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    return [[free.pop() for _ in range(n)] for n in need], num_blocks


def check_attention(plan: Plan, hq: int, hkv: int, d: int, prefill: bool, seed: int) -> dict:
    """One step through the backend under test (bf16) and the torch backend (float32)."""
    from adrenaline.kernels.metadata import AttentionMetadata
    from adrenaline.kernels.torch_backend import TorchAttention

    rng, bs, dev = random.Random(seed), 16, plan.device
    torch.manual_seed(seed)
    if prefill:
        specs = [(0, 17), (37, 64), (100, 1), (16, 33), (0, 5)]
    else:
        specs = [(rng.randrange(1, 700), 1) for _ in range(12)] + [(15, 1), (16, 1)]
    tables, nb = _scenario(specs, bs, rng)
    kw = dict(is_prefill=prefill, query_lens=[q for _, q in specs],
              context_lens=[c for c, _ in specs], block_tables=tables, block_size=bs, device=dev)
    tokens = sum(q for _, q in specs)
    q = torch.randn(tokens, hq, d, device=dev).to(torch.bfloat16)
    k = torch.randn(tokens, hkv, d, device=dev).to(torch.bfloat16)
    v = torch.randn(tokens, hkv, d, device=dev).to(torch.bfloat16)
    k_slots = torch.randn(nb * bs, hkv, d, device=dev).to(torch.bfloat16)
    v_slots = torch.randn(nb * bs, hkv, d, device=dev).to(torch.bfloat16)

    test, ref = backend_under_test(plan, hq, hkv, d, torch.bfloat16), TorchAttention(hq, hkv, d)
    kc, vc = _to_backend_layout(test, k_slots, nb, bs), _to_backend_layout(test, v_slots, nb, bs)
    rk = _to_backend_layout(ref, k_slots.float(), nb, bs)
    rv = _to_backend_layout(ref, v_slots.float(), nb, bs)
    meta, rmeta = AttentionMetadata.build(**kw), AttentionMetadata.build(**kw)
    test.prepare(meta)
    ref.prepare(rmeta)
    out = test.forward(q, k, v, kc, vc, meta).float()
    want = ref.forward(q.float(), k.float(), v.float(), rk, rv, rmeta)
    sync(dev)
    rel = float((out - want).norm() / want.norm())
    # KV append: the new tokens' slots hold exactly k, v; every other slot is untouched.
    k_slots[meta.slot_mapping] = k
    v_slots[meta.slot_mapping] = v
    append_ok = bool(torch.equal(_to_logical(test, kc, nb, bs), k_slots)
                     and torch.equal(_to_logical(test, vc, nb, bs), v_slots))
    ok = rel < 2e-2 and append_ok and bool(torch.isfinite(out).all())
    return {"shape": f"{hq}/{hkv}/{d}", "kind": "prefill" if prefill else "decode",
            "rel_err": rel, "kv_append_exact": append_ok, "ok": ok}


def check_ops(plan: Plan, head_dim: int, seed: int) -> list[dict]:
    """The fused elementwise ops (bf16) against TorchOps in float32 on the same inputs."""
    from adrenaline.kernels.ops import RotaryEmbedding, TorchOps

    if plan.dry_run:
        test_ops = TorchOps()  # flashinfer's ops need CUDA: the dry run checks the harness
    else:
        from adrenaline.kernels.flashinfer_ops import FlashInferOps
        test_ops = FlashInferOps()
    ref, dev, bf = TorchOps(), plan.device, torch.bfloat16
    torch.manual_seed(seed)
    t, h = 37, plan.model["hidden_size"]

    def rnd(*shape):
        return torch.randn(*shape, device=dev).to(bf)

    def rel(got, want):
        return float((got.float() - want).norm() / want.norm())

    x, res, w = rnd(t, h), rnd(t, h), rnd(h)
    rows = [("rms_norm", rel(test_ops.rms_norm(x, w, 1e-5), ref.rms_norm(x.float(), w.float(), 1e-5)))]
    got_x, got_res = test_ops.add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    want_x, want_res = ref.add_rms_norm(x.float(), res.float(), w.float(), 1e-5)
    rows.append(("add_rms_norm", max(rel(got_x, want_x), rel(got_res, want_res))))
    gu = rnd(t, 2 * h)
    rows.append(("silu_and_mul", rel(test_ops.silu_and_mul(gu), ref.silu_and_mul(gu.float()))))
    max_pos = plan.model["max_position_embeddings"]
    rot32 = RotaryEmbedding(head_dim, max_pos, 10000.0, None, torch.float32, dev)
    rot = RotaryEmbedding(head_dim, max_pos, 10000.0, None, bf, dev)
    pos = torch.randint(0, max_pos, (t,), device=dev)
    q, k = rnd(t, 8, head_dim), rnd(t, 2, head_dim)
    gq, gk = test_ops.rope(rot, pos, q.clone(), k.clone())
    wq, wk = ref.rope(rot32, pos, q.float(), k.float())
    rows.append((f"rope d={head_dim}", max(rel(gq, wq), rel(gk, wk))))
    return [{"op": name, "rel_err": err, "ok": err < 1e-2} for name, err in rows]


def stage_kernels(plan: Plan, ctx: dict) -> dict:
    rows = [check_attention(plan, hq, hkv, d, prefill, seed=i)
            for i, (hq, hkv, d) in enumerate(plan.head_shapes) for prefill in (False, True)]
    ops = [r for d in sorted({d for _, _, d in plan.head_shapes}) for r in check_ops(plan, d, d)]
    bad = [r for r in rows + ops if not r["ok"]]
    return {"rows": rows, "ops": ops, "ok": not bad,
            "max_rel_err": max(r["rel_err"] for r in rows),
            "ops_max_rel_err": max(r["rel_err"] for r in ops)}
