"""What `bench offload` derives from worker metrics, and how it prints its rows."""

from __future__ import annotations

from adrenaline.bench.report import print_table


def _delta(before, after, role: str, field: str) -> float:
    b = sum(getattr(m, field) for m in before if m.role == role)
    a = sum(getattr(m, field) for m in after if m.role == role)
    return a - b


def worker_stats(before, after, samples, elapsed: float, profile: dict | None = None) -> dict:
    """Decode batch and step, the wait on executors, the prefill side's use, from the
    workers' cumulative metrics before and after a run (``samples``: taken during it)."""
    steps = _delta(before, after, "decode", "num_steps")
    step_s = _delta(before, after, "decode", "step_time_s")
    batch = _delta(before, after, "decode", "batch_size_sum") / max(steps, 1)
    out = {"mean_decode_batch": batch, "decode_step_ms": 1e3 * step_s / max(steps, 1),
           # the decode engine thread's own CPU time per step (the rest: off its core; its
           # polling while it waits on executors counts as CPU)
           "decode_step_cpu_ms": 1e3 * _delta(before, after, "decode", "step_cpu_s")
           / max(steps, 1)}
    waits = _delta(before, after, "decode", "num_remote_waits")
    if waits:
        wait_s = _delta(before, after, "decode", "remote_wait_s")
        out["remote_wait_per_layer_ms"] = 1e3 * wait_s / waits
        out["remote_wait_share_of_step"] = wait_s / max(step_s, 1e-9)
    # Prefill side = the prefill worker's pool plus its executor's (the idle GPU memory).
    side = [[m for m in s if m.role in ("prefill", "executor")] for s in samples]
    used = [sum(m.kv_blocks_used for m in s) / max(sum(m.kv_blocks_total for m in s), 1)
            for s in side if s]
    out["prefill_side_kv_use_mean"] = sum(used) / max(len(used), 1)
    out["prefill_side_kv_use_max"] = max(used, default=0.0)
    out["executor_attention_gbs"] = _delta(before, after, "executor", "kv_bytes_read") / elapsed / 1e9
    out["executor_busy_share"] = _delta(before, after, "executor", "busy_s") / elapsed
    out["executor_cpu_share"] = _delta(before, after, "executor", "busy_cpu_s") / elapsed
    # The executor's CPU spent polling for messages (its serving CPU beyond attention),
    # and the time it napped between layers instead.
    out["executor_poll_cpu_share"] = (_delta(before, after, "executor", "serve_cpu_s")
                                      - _delta(before, after, "executor", "busy_cpu_s")) / elapsed
    out["executor_nap_share"] = _delta(before, after, "executor", "napped_s") / elapsed
    # The prefill instance's core: its prefill steps plus its executor's attention.
    out["prefill_core_util"] = (_delta(before, after, "prefill", "step_time_s")
                                + _delta(before, after, "executor", "busy_s")) / elapsed
    if profile and steps:
        # Attention's share of a decode step, by the start-up profile: the KV the step's
        # local attention reads (all running requests' context, minus the offloaded share).
        running = [sum(m.num_running - m.num_offloaded for m in s if m.role == "decode")
                   for s in samples]
        out["profile_attention_us_per_token"] = profile["decode_attn_us_per_token"][0]
        out["mean_local_requests"] = sum(running) / max(len(running), 1)
    return out


def saturated_worker_stats(samples: list[tuple[float, list]], window: list[float]) -> dict:
    """The decode's batch, step, offloaded requests and wait on executors over the samples
    (time, worker metrics) that lie in ``window`` (the saturated window, same clock);
    empty when fewer than two samples do."""
    inside = [(t, ms) for t, ms in samples if window[0] <= t <= window[1]]
    if len(inside) < 2:
        return {}
    first, last = inside[0][1], inside[-1][1]
    steps = _delta(first, last, "decode", "num_steps")
    if not steps:
        return {}
    out = {"saturated_decode_batch": _delta(first, last, "decode", "batch_size_sum") / steps,
           "saturated_decode_step_ms": 1e3 * _delta(first, last, "decode", "step_time_s") / steps,
           "saturated_decode_step_cpu_ms": 1e3 * _delta(first, last, "decode", "step_cpu_s")
           / steps,
           "saturated_offloaded_requests": sum(
               m.num_offloaded for _, ms in inside for m in ms if m.role == "decode")
           / len(inside)}
    waits = _delta(first, last, "decode", "num_remote_waits")
    if waits:
        out["saturated_remote_wait_per_layer_ms"] = \
            1e3 * _delta(first, last, "decode", "remote_wait_s") / waits
    # The decode's own output rate (its batch over its step), to set beside the rate the
    # clients received: the difference is the delivery path's.
    out["saturated_decode_tok_s"] = (out["saturated_decode_batch"]
                                     / max(out["saturated_decode_step_ms"], 1e-9) * 1e3)
    span = inside[-1][0] - inside[0][0]
    if any(m.role == "executor" for m in last) and span > 0:
        out["saturated_executor_poll_cpu_share"] = (
            _delta(first, last, "executor", "serve_cpu_s")
            - _delta(first, last, "executor", "busy_cpu_s")) / span
        out["saturated_executor_nap_share"] = _delta(first, last, "executor", "napped_s") / span
    return out


def print_rows(result: dict) -> None:
    w = result["workload"]
    print(f"\noffload benchmark: {result['model']} {result['dtype']}, {w['num_requests']} "
          f"requests ({w['dataset']}, mean {w['mean_prompt_len']:.0f} -> "
          f"{w['mean_output_len']:.0f} tokens), decode KV {w['decode_kv_tokens']} tokens, "
          f"executor KV {w['executor_kv_tokens']} tokens, pinned {w['pin']}")
    for r in result["rows"]:
        r["label"] = f"{r['system']}@{r['rate']:g}"
    # (key, header, width, decimals)
    cols = [("output_tok_s", "tok/s", 8, 1), ("vs_none", "x none", 7, 2),
            ("saturated_output_tok_s", "sat t/s", 8, 1), ("saturated_vs_none", "x none", 7, 2),
            ("tpot_p50_ms", "TPOT50", 7, 1), ("tpot_p90_ms", "TPOT90", 7, 1),
            ("tpot_p99_ms", "TPOT99", 7, 1), ("ttft_p50_ms", "TTFT50", 7, 0),
            ("ttft_p90_ms", "TTFT90", 7, 0), ("mean_decode_batch", "batch", 6, 1),
            ("saturated_decode_batch", "sat b", 6, 1),
            ("saturated_decode_step_ms", "sat st", 7, 1),
            ("saturated_decode_tok_s", "dec t/s", 8, 1),
            ("offload_ratio", "offl", 5, 2), ("decode_step_ms", "step", 6, 1),
            ("decode_step_cpu_ms", "cpu", 6, 1),
            ("remote_wait_per_layer_ms", "rt/lyr", 7, 3),
            ("remote_wait_share_of_step", "rt%step", 8, 2),
            ("attention_share_of_step", "attn%", 6, 2), ("prefill_core_util", "p-core", 7, 2),
            ("executor_attention_gbs", "exGB/s", 7, 2),
            ("executor_poll_cpu_share", "ex-poll", 8, 2), ("executor_nap_share", "ex-nap", 7, 2),
            ("greedy_mismatches", "mism", 5, 0)]
    print_table(result["rows"], cols, label=("label", 16))
