"""Stage engine: a random ~1B Llama in bf16: decode step time with and without CUDA
graphs at several batch sizes, bandwidth-roofline share, and the graph replay's logits
against the eager step's.
"""

from __future__ import annotations

import time

import torch

from adrenaline.bench.gpu_check.common import Plan, model_dir, time_median


def _eager_logits(engine, step) -> torch.Tensor:
    runner = engine.runner
    ids, pos = runner.build_inputs(step)
    attention = runner._local_attention(runner.build_metadata(step, list(range(len(step.requests)))))
    return runner.model.compute_logits(runner.model(ids, pos, attention))


def stage_engine(plan: Plan, ctx: dict) -> dict:
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore
    from adrenaline.engine.kv_pool import kv_bytes_per_token
    from adrenaline.engine.step_profile import profile_decode_steps
    from adrenaline.sampling_params import SamplingParams

    top = max(plan.batches)
    t0 = time.perf_counter()
    def make_engine(fused_ops: bool) -> EngineCore:
        return EngineCore(str(model_dir(plan, ctx)), dtype="bfloat16", device=str(plan.device),
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
