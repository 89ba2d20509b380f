"""The GPU path checked in one run: kernels, bandwidth, engine roofline, CUDA graphs, offload.

    python -m adrenaline.bench gpu-check --out DIR            # on a CUDA machine
    python -m adrenaline.bench gpu-check --dry-run --out DIR  # on CPU (CI): same stages, tiny sizes

Stages (each one timed, its failure recorded without stopping the rest):
  env          torch / CUDA / device / flashinfer / cupy versions
  ceilings     device copy bandwidth (read + write) and bf16 matmul rate
  kernels      the flashinfer backend against the torch backend in float32 (decode,
               prefill with cached context, KV append) for several head shapes
  attn_bw      flashinfer paged decode: KV bytes read per second vs copy bandwidth,
               on the whole device and on green-context SM partitions (executor share)
  engine       a random ~1B Llama in bf16: decode step time with and without CUDA
               graphs at several batch sizes, bandwidth-roofline share, and the
               graph replay's logits against the eager step's
  offload      prefill + attention executor + decode on one device (engine/colocated.py):
               greedy tokens against the offline engine (float32, torch attention:
               exact; bf16, flashinfer, executor on an SM partition: reported)
  offload_tput decode throughput with the decode KV budget capping the batch: all local
               (none) vs local-then-executor placement (offload), side by side
  nccl         the cupy NCCL communicator up to what one GPU allows (id, 1-rank world)

In --dry-run every stage runs on CPU with tiny shapes and the torch backend in
place of flashinfer (the GPU-only parts say "skipped"), so the script cannot rot.
A short table is printed last; gpu_check.json (and the log) go to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from adrenaline.bench.report import result_header

MODEL_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                max_position_embeddings=4096, torch_dtype="bfloat16")
MODEL_DRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=512, torch_dtype="bfloat16")


@dataclass
class Plan:
    device: torch.device
    dry_run: bool
    head_shapes: list[tuple[int, int, int]]  # (q heads, kv heads, head dim)
    copy_bytes: int
    matmul_size: int
    bw_batch: int
    bw_context: int
    model: dict
    batches: list[int]
    prompt_len: int
    steps: int
    offload_prompts: int
    offload_tokens: int


def make_plan(dry_run: bool) -> Plan:
    if dry_run:
        return Plan(torch.device("cpu"), True, [(4, 2, 16), (4, 4, 8)], 16 << 20, 256, 4, 64,
                    MODEL_DRY, [1, 4], 16, 3, 4, 6)
    return Plan(torch.device("cuda", 0), False, [(32, 8, 128), (16, 16, 64), (28, 4, 128), (32, 8, 64)],
                1 << 30, 8192, 128, 2048, MODEL_1B, [1, 8, 32, 128], 512, 10, 8, 24)


# ---- timing helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ---- stages

def stage_env(plan: Plan, ctx: dict) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if plan.device.type == "cuda":
        p = torch.cuda.get_device_properties(plan.device)
        out.update(device=p.name, sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    try:
        import flashinfer
        out["flashinfer"] = flashinfer.__version__
    except Exception as e:  # recorded, not fatal: the stages that need it fail on their own
        out["flashinfer"] = f"unavailable: {e}"
    try:
        import cupy
        out["cupy"] = cupy.__version__
    except Exception as e:
        out["cupy"] = f"unavailable: {e}"
    return out


def stage_ceilings(plan: Plan, ctx: dict) -> dict:
    dev = plan.device
    src = torch.randn(plan.copy_bytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    t = time_median(lambda: dst.copy_(src), dev)
    copy_gbs = 2 * plan.copy_bytes / t / 1e9  # bytes read + written
    n = plan.matmul_size
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    t = time_median(lambda: a @ b, dev, repeats=5)
    ctx["copy_gbs"] = copy_gbs
    return {"copy_gbs": copy_gbs, "bf16_matmul_tflops": 2 * n ** 3 / t / 1e12}


def _backend(plan: Plan, hq: int, hkv: int, d: int, dtype: torch.dtype):
    from adrenaline.kernels import make_attention_backend
    name = "torch" if plan.dry_run else "flashinfer"
    return make_attention_backend(name, plan.device, hq, hkv, d, dtype)


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

    test, ref = _backend(plan, hq, hkv, d, torch.bfloat16), TorchAttention(hq, hkv, d)
    kc, vc = _to_backend_layout(test, k_slots, nb, bs), _to_backend_layout(test, v_slots, nb, bs)
    rk = _to_backend_layout(ref, k_slots.float(), nb, bs)
    rv = _to_backend_layout(ref, v_slots.float(), nb, bs)
    meta, rmeta = AttentionMetadata.build(**kw), AttentionMetadata.build(**kw)
    test.prepare(meta)
    ref.prepare(rmeta)
    out = test.forward(q, k, v, kc, vc, meta).float()
    want = ref.forward(q.float(), k.float(), v.float(), rk, rv, rmeta)
    _sync(dev)
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


def _decode_case(plan: Plan, hq: int, hkv: int, d: int):
    """A bandwidth-sized decode step: returns (run, kv_bytes_read)."""
    from adrenaline.kernels.metadata import AttentionMetadata

    b, ctx_len, bs, dev = plan.bw_batch, plan.bw_context, 16, plan.device
    pages = -(-(ctx_len + 1) // bs)
    nb = b * pages
    perm = torch.randperm(nb).tolist()
    tables = [perm[i * pages:(i + 1) * pages] for i in range(b)]
    backend = _backend(plan, hq, hkv, d, torch.bfloat16)
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


def _model_dir(plan: Plan, ctx: dict) -> Path:
    if "model_dir" not in ctx:
        from adrenaline.model.builtin import write_random_checkpoint
        root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        ctx["model_dir"] = write_random_checkpoint(root / "llama", plan.model)
    return ctx["model_dir"]


def _eager_logits(engine, step) -> torch.Tensor:
    runner = engine.runner
    ids, pos = runner.build_inputs(step)
    attention = runner._local_attention(runner.build_metadata(step, list(range(len(step.requests)))))
    return runner.model.compute_logits(runner.model(ids, pos, attention))


def stage_engine(plan: Plan, ctx: dict) -> dict:
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore
    from adrenaline.engine.kv_pool import kv_bytes_per_token
    from adrenaline.policy.profile import profile_decode_steps
    from adrenaline.sampling_params import SamplingParams

    top = max(plan.batches)
    t0 = time.perf_counter()
    def make_engine(fused_ops: bool) -> EngineCore:
        return EngineCore(str(_model_dir(plan, ctx)), dtype="bfloat16", device=str(plan.device),
                          config=EngineConfig(max_num_seqs=top, max_model_len=2048,
                                              kv_cache_tokens=top * (plan.prompt_len + 64),
                                              cuda_graph_max_batch=top, fused_ops=fused_ops))

    engine = make_engine(fused_ops=True)
    load_s = time.perf_counter() - t0
    graphs = engine.runner.graphs
    with_graphs = profile_decode_steps(engine, plan.batches, plan.prompt_len, plan.steps)
    engine.runner.graphs = None
    eager = profile_decode_steps(engine, plan.batches, plan.prompt_len, plan.steps)
    engine.runner.graphs = graphs

    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    params = sum(p.numel() for p in engine.model.parameters())
    kv_token = kv_bytes_per_token(engine.model_config, engine.dtype)
    seq = plan.prompt_len + plan.steps // 2
    copy = ctx.get("copy_gbs")
    rows = []
    for b in plan.batches:
        t = with_graphs.get(b) if graphs is not None else eager.get(b)
        if t is None:
            continue
        moved = weights + b * seq * kv_token
        rows.append({"batch": b, "eager_ms": eager[b] * 1e3,
                     "graph_ms": with_graphs[b] * 1e3 if graphs is not None else None,
                     "graph_speedup": eager[b] / with_graphs[b] if graphs is not None else None,
                     "tok_s": b / t, "gbs": moved / t / 1e9,
                     "roofline_share": moved / t / 1e9 / copy if copy else None})
    out = {"params_m": params / 1e6, "weight_mb": weights / 1e6, "load_s": load_s, "rows": rows,
           "graphs": graphs is not None, "ops": engine.model.layers[0].ops.name}
    if plan.device.type == "cuda":  # the same model with plain torch ops, graphs on
        plain = make_engine(fused_ops=False)
        unfused = profile_decode_steps(plain, plan.batches, plan.prompt_len, plan.steps)
        for row in rows:
            row["torch_ops_graph_ms"] = unfused[row["batch"]] * 1e3
            pg = plain.runner.graphs.graphs[plain.runner.graphs.bucket_for(row["batch"])]
            row["torch_ops_replay_ms"] = time_median(pg.replay, plan.device, repeats=20) * 1e3
        del plain
    if graphs is not None:  # the replay alone, without the step's host work (schedule, plan, sample)
        for row in rows:
            g = graphs.graphs[graphs.bucket_for(row["batch"])]
            row["replay_ms"] = time_median(g.replay, plan.device, repeats=20) * 1e3
    if graphs is None:
        out["graph_check"] = "skipped (no CUDA graphs on this device/backend)"
        return out
    # The graph replay must compute what the eager step computes, for a batch between buckets.
    n = 5
    params_g = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = [f"graph-check-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [3 + (11 * i + t) % 900 for t in range(40 + 13 * i)], params_g)
    while engine.scheduler.waiting:
        engine.step()
    step = engine.scheduler.schedule()
    with torch.inference_mode():
        got = engine.runner._replay_decode(step).clone()
        want = _eager_logits(engine, step)
    rel = float((got - want).norm() / want.norm())
    same_argmax = bool(torch.equal(got.argmax(-1), want.argmax(-1)))
    for rid in ids:
        engine.abort(rid)
    out["graph_check"] = {"batch": n, "bucket": graphs.bucket_for(n), "rel_err": rel,
                          "same_argmax": same_argmax, "ok": rel < 2e-2 and same_argmax}
    return out


def _offload_run(plan: Plan, ctx: dict, dtype: str, backend: str, executor_stream) -> dict:
    from adrenaline.config import EngineConfig
    from adrenaline.engine.colocated import ColocatedPD
    from adrenaline.engine.llm import LLM
    from adrenaline.sampling_params import SamplingParams

    rng = random.Random(11)
    vocab = plan.model["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(20, 200 if not plan.dry_run
                                                                     else 40))]
               for _ in range(plan.offload_prompts)]
    params = SamplingParams(max_tokens=plan.offload_tokens, temperature=0, ignore_eos=True)
    model, dev = str(_model_dir(plan, ctx)), str(plan.device)
    opts = dict(attention_backend=backend, kv_cache_tokens=16384, max_model_len=2048,
                max_num_seqs=16)
    llm = LLM(model, dtype=dtype, device=dev, **opts)
    want = [o.token_ids for o in llm.generate(prompts, params)]
    del llm
    pd = ColocatedPD(model, dtype=dtype, device=dev, prefill=EngineConfig(**opts),
                     decode=EngineConfig(**opts), executor=EngineConfig(**opts),
                     executor_stream=executor_stream)
    try:
        got = [r.output_token_ids for r in pd.generate(prompts, params, offload=lambda i: i % 2 == 0)]
        left = pd.blocks_in_use()
        steps = pd.executor.num_steps
    finally:
        pd.close()
    match = sum(g == w for g, w in zip(got, want))
    first_diff = [next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
                  for g, w in zip(got, want)]
    return {"dtype": dtype, "backend": backend, "requests": len(prompts),
            "offloaded": (len(prompts) + 1) // 2, "equal": match, "first_diff": first_diff,
            "executor_steps": steps, "blocks_left": left,
            "ok": match == len(prompts) and not any(left.values()) and steps > 0}


def stage_offload(plan: Plan, ctx: dict) -> dict:
    # float32 with the torch attention backend: must equal the offline engine token for token.
    exact = _offload_run(plan, ctx, "float32", "torch", None)
    out = {"exact": exact, "ok": exact["ok"]}
    if plan.device.type != "cuda":
        out["bf16_flashinfer"] = "skipped (CPU)"
        return out
    from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

    streams, resources = split_device_green_ctx_by_sm_count(plan.device, [32])
    bf16 = _offload_run(plan, ctx, "bfloat16", "flashinfer", streams[0])
    bf16["executor_sms"] = resources[0].sm.smCount
    out["bf16_flashinfer"] = bf16  # bf16 batch shapes differ between the two runs: reported
    return out


def stage_offload_tput(plan: Plan, ctx: dict) -> dict:
    """Decode throughput on one device when the decode KV budget caps the batch.

    The decode pool holds ``cap`` requests' final KV; the executor beside it holds
    3 x cap more. ``none`` keeps every request local (batch <= cap); ``offload``
    places requests locally while they fit, then on the executor (its kernels on
    a green-context SM partition on CUDA). Same prompts, greedy, both in one run.
    """
    from adrenaline.config import EngineConfig
    from adrenaline.engine.colocated import ColocatedPD
    from adrenaline.sampling_params import SamplingParams

    cap, prompt_len, out_len = (4, 24, 8) if plan.dry_run else (32, 512, 128)
    n = 4 * cap
    rng = random.Random(5)
    vocab = plan.model["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(n)]
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    per_req = -(-(prompt_len + out_len) // 16) * 16
    stream, sms = None, None
    if plan.device.type == "cuda":
        from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

        streams, resources = split_device_green_ctx_by_sm_count(plan.device, [64])
        stream, sms = streams[0], resources[0].sm.smCount
    common = dict(max_model_len=2048, max_num_seqs=n)
    rows, left = {}, {}
    # (row, executor called in-line by the decode thread?, placement)
    runs = [("none", False, lambda i: False), ("offload", False, "capacity"),
            ("offload_inline", True, "capacity")]
    for inline in (False, True):
        pd = ColocatedPD(str(_model_dir(plan, ctx)), dtype="bfloat16", device=str(plan.device),
                         prefill=EngineConfig(kv_cache_tokens=n * per_req, cuda_graph_max_batch=0,
                                              **common),
                         decode=EngineConfig(kv_cache_tokens=cap * per_req, **common),
                         executor=EngineConfig(kv_cache_tokens=3 * cap * per_req, **common),
                         executor_stream=stream, inline=inline)
        try:
            for name, how in [(name, how) for name, il, how in runs if il == inline]:
                # Warm-up over the same batch sizes: captures graphs and plans outside the timing.
                pd.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                            offload=how)
                _sync(plan.device)
                t0 = time.perf_counter()
                done = pd.generate(prompts, params, offload=how)
                _sync(plan.device)
                wall = time.perf_counter() - t0
                tokens = sum(r.num_output_tokens for r in done)
                rows[name] = {"output_tok_s": tokens / wall, "wall_s": wall,
                              "mean_decode_batch": pd.batch_size_sum / pd.num_steps,
                              "decode_steps": pd.num_steps, "step_ms": wall / pd.num_steps * 1e3,
                              "outputs": [r.output_token_ids for r in done]}
            left = {k: left.get(k, 0) + v for k, v in pd.blocks_in_use().items()}
        finally:
            pd.close()
    outputs = {name: row.pop("outputs") for name, row in rows.items()}
    same = {name: sum(a == b for a, b in zip(outputs["none"], out))
            for name, out in outputs.items() if name != "none"}
    # Where each request's tokens first differ from none's (bf16 at other batch shapes).
    first_diff = {name: [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                         for a, b in zip(outputs["none"], out)]
                  for name, out in outputs.items() if name != "none"}
    return {"requests": n, "prompt_len": prompt_len, "output_len": out_len,
            "decode_capacity_requests": cap, "executor_sms": sms, "rows": rows,
            "speedup": {name: row["output_tok_s"] / rows["none"]["output_tok_s"]
                        for name, row in rows.items() if name != "none"},
            "same_tokens_as_none": same, "first_diff_vs_none": first_diff, "blocks_left": left, "ok": not any(left.values())}



def stage_nccl(plan: Plan, ctx: dict) -> dict:
    if plan.device.type != "cuda":
        return {"status": "skipped (CPU)"}
    from adrenaline.transport.nccl import NcclCommunicator, new_nccl_unique_id

    uid = new_nccl_unique_id()
    comm = NcclCommunicator(1, uid, 0)
    comm.close()
    return {"unique_id_bytes": len(bytes.fromhex(uid)), "one_rank_world": "init + close ok",
            "unverified": "send/recv between two ranks (needs two GPUs)"}


STAGES = [("env", stage_env), ("ceilings", stage_ceilings), ("kernels", stage_kernels),
          ("attn_bw", stage_attn_bw), ("engine", stage_engine), ("offload", stage_offload),
          ("offload_tput", stage_offload_tput), ("nccl", stage_nccl)]


def _verdict(result) -> str:
    if isinstance(result, dict) and result.get("ok") is False:
        return "MISMATCH"
    return "ok"


def summary_lines(results: dict) -> list[str]:
    """The short table printed last."""
    lines = [f"{'stage':<13}{'status':<10}{'seconds':>8}  key numbers"]
    for name, r in results["stages"].items():
        res = r.get("result") or {}
        key = ""
        if name == "env" and res:
            key = f"{res.get('device', 'cpu')} torch {res['torch']} flashinfer {res.get('flashinfer')}"
        elif name == "ceilings" and res:
            key = f"copy {res['copy_gbs']:.0f} GB/s, bf16 matmul {res['bf16_matmul_tflops']:.1f} TFLOP/s"
        elif name == "kernels" and res:
            key = (f"{len(res['rows'])} attention cases, max rel err {res['max_rel_err']:.2e}; "
                   f"{len(res['ops'])} fused ops, max rel err {res['ops_max_rel_err']:.2e}")
        elif name == "attn_bw" and res:
            share = res["share_of_copy_bw"]
            key = f"{res['gbs']:.0f} GB/s" + (f" = {share:.2f} of copy bw" if share else "")
            if isinstance(res["partitions"], list):
                key += "; " + ", ".join(f"{p['sms']} SMs {p['vs_full_device']:.2f}x"
                                        for p in res["partitions"])
        elif name == "engine" and res:
            key = "; ".join(f"b{x['batch']} {x['eager_ms']:.1f}"
                            + (f"/{x['graph_ms']:.1f}ms graph" if x["graph_ms"] else "ms")
                            + (f" (replay {x['replay_ms']:.2f})" if "replay_ms" in x else "")
                            + (f" torch-ops {x['torch_ops_graph_ms']:.1f} (replay "
                               f"{x['torch_ops_replay_ms']:.2f})" if "torch_ops_graph_ms" in x
                               else "")
                            + (f" {x['roofline_share']:.2f} bw" if x["roofline_share"] else "")
                            for x in res["rows"])
        elif name == "offload" and res:
            ex = res["exact"]
            key = f"fp32 {ex['equal']}/{ex['requests']} equal"
            if isinstance(res.get("bf16_flashinfer"), dict):
                bf = res["bf16_flashinfer"]
                key += f"; bf16 {bf['equal']}/{bf['requests']} equal"
        elif name == "offload_tput" and res:
            rw = res["rows"]
            key = "; ".join(f"{k} {v['output_tok_s']:.0f} tok/s (batch {v['mean_decode_batch']:.0f}"
                            + (f", {res['speedup'][k]:.2f}x, same tokens "
                               f"{res['same_tokens_as_none'][k]}/{res['requests']})"
                               if k != "none" else ")")
                            for k, v in rw.items())
        elif name == "nccl" and res:
            key = res.get("status") or res.get("one_rank_world", "")
        lines.append(f"{name:<13}{r['status']:<10}{r['seconds']:>8.1f}  {key}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench gpu-check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch backend")
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--stages", default=",".join(n for n, _ in STAGES))
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run")
    plan = make_plan(args.dry_run)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    results = {**result_header("gpu-check"), "dry_run": args.dry_run, "stages": {}}
    ctx: dict = {}
    for name, fn in STAGES:
        if name not in wanted:
            continue
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(plan, ctx)
            entry = {"status": _verdict(res), "result": res}
        except Exception as e:
            entry = {"status": "ERROR", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}
            print(entry["traceback"], flush=True)
        entry["seconds"] = time.perf_counter() - t0
        results["stages"][name] = entry
        print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']:.1f}s "
              f"{json.dumps(entry.get('result'), default=str)[:2000]}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + "\n".join(summary_lines(results)), flush=True)
    return results


if __name__ == "__main__":
    main()
