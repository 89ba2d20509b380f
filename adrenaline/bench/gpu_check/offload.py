"""Stage offload: prefill + attention executor + decode on one device
(engine/colocated.py), greedy tokens against the offline engine (float32, torch attention:
exact; bf16, flashinfer, executor on an SM partition: reported).
"""

from __future__ import annotations

import random

from adrenaline.bench.gpu_check.common import Plan, model_dir


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
    model, dev = str(model_dir(plan, ctx)), str(plan.device)
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
