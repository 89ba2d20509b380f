"""Stage offload_tput: decode throughput with the decode KV budget capping the batch,
all local (none) against local-then-executor placement (offload), side by side.
"""

from __future__ import annotations

import random
import time

from adrenaline.bench.gpu_check.common import Plan, model_dir, sync


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
        pd = ColocatedPD(str(model_dir(plan, ctx)), dtype="bfloat16", device=str(plan.device),
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
                sync(plan.device)
                t0 = time.perf_counter()
                done = pd.generate(prompts, params, offload=how)
                sync(plan.device)
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
