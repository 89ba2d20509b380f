"""A finished simulation as the serving benchmark's metrics, plus what only a simulator sees.

Serving metrics come from bench/serving_metrics.py (the same definitions as a
live `bench serving` run); ITL percentiles from the requests whose every token
time was kept (up to MAX_TIMELINES of them, spread over the run).
"""

from __future__ import annotations

from adrenaline.bench.serving_metrics import LatencyStats, RequestTimeline, Slo, compute_metrics
from adrenaline.sim.simulator import Simulation


def timelines(sim: Simulation) -> list[RequestTimeline]:
    out = []
    for r in sim.requests:
        n = r.n_out
        if r.first_token_s is None:
            out.append(RequestTimeline(start=r.arrival_s, success=False, error="refused"))
            continue
        times = [r.first_token_s] + ([r.end_s] if n > 1 else [])
        out.append(RequestTimeline(start=r.arrival_s, token_times=times, num_output_tokens=n,
                                   prompt_tokens=r.req.num_prompt_tokens, end=r.end_s))
    return out


def summarize(sim: Simulation, slo: Slo | None = None) -> dict:
    tl = timelines(sim)
    start = min((r.arrival_s for r in sim.requests), default=0.0)
    end = max((r.end_s for r in sim.requests if r.end_s is not None), default=start)
    m = compute_metrics(tl, max(end - start, 1e-9), slo)
    itls = [b - a for r in sim.requests if r.token_times
            for a, b in zip(r.token_times, r.token_times[1:])]
    m.itl_ms = LatencyStats.of(itls, tuple(int(k[1:]) for k in m.itl_ms.percentiles))
    steps = sum(d.num_steps for d in sim.decode)
    placed = sim.router.num_placed
    side = [sum(v for k, v in s["kv_use"].items() if not k.startswith("decode"))
            / max(sum(1 for k in s["kv_use"] if not k.startswith("decode")), 1)
            for s in sim.samples]
    unfinished = sum(1 for r in sim.requests if r.end_s is None)
    # PARKED: from the first token to admission (what the prefill gate keeps out of TPOT)
    parked = [r.admitted_s - r.first_token_s for r in sim.requests
              if r.admitted_s is not None and r.first_token_s is not None]
    return {
        "metrics": m.flat(),
        "offload_ratio": sim.router.num_offloaded / placed if placed else 0.0,
        "mean_decode_batch": sum(d.batch_sum for d in sim.decode) / max(steps, 1),
        "decode_step_ms": 1e3 * sum(d.step_time_s for d in sim.decode) / max(steps, 1),
        # bench offload's, per layer of an offloaded step (the same with one executor)
        "remote_wait_per_layer_ms": 1e3 * sum(d.remote_wait_s for d in sim.decode)
        / max(sum(d.num_offloaded_steps for d in sim.decode) * sim.model.layers, 1),
        "num_preemptions": sum(d.scheduler.num_preemptions for d in sim.decode),
        "num_refused": sim.num_refused, "num_rejected": sim.num_rejected,
        "num_unfinished": unfinished,
        "parked_s_mean": sum(parked) / len(parked) if parked else 0.0,
        "parked_s_max": max(parked, default=0.0),
        "executor_overflows": sum(e.overflows for e in sim.executors),
        "b_max": getattr(sim.policy, "b_max", None), "ob_mem": getattr(sim.policy, "ob_mem", None),
        "prefill_side_kv_use_mean": sum(side) / max(len(side), 1),
        "prefill_side_kv_use_max": max(side, default=0.0),
        "executor_attention_gbs": (sum(d.kv_read_bytes for d in sim.decode)
                                   / max(end - start, 1e-9) / 1e9),
        "kv_budgets_tokens": {"prefill": sim.prefill[0].bm.num_blocks * sim.cfg.block_size,
                              "decode": sim.decode[0].bm.num_blocks * sim.cfg.block_size,
                              "executor": (sim.executors[0].capacity_tokens
                                           if sim.executors else 0)},
    }
