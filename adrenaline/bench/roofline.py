"""The machine's own ceilings, and where the decode step sits against them.

Measures, with the given torch thread budget: memory bandwidth (a large
tensor copy, read + write), peak matmul rate (large bf16/fp32 GEMMs), and
the engine's decode step time at several batch sizes. For each batch it
reports the step's bytes read (all weights once + the batch's KV) over the
step time as a share of the measured bandwidth, and its FLOPs over the step
time as a share of the measured matmul peak.

    python -m adrenaline.bench roofline --out FILE.json
"""

from __future__ import annotations

import argparse
import time

import torch

from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.engine.step_profile import measure_copy_bandwidth, profile_decode_steps


def measure_matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a square GEMM (best of ``repeats``)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def decode_step_times(model: str, dtype: str, batches: list[int], prompt_len: int,
                      steps: int, threads: int) -> tuple[dict[int, float], object]:
    """Median decode step seconds per batch size, on one EngineCore."""
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore

    engine = EngineCore(model, dtype=dtype, config=EngineConfig(
        num_threads=threads, max_num_seqs=max(batches),
        kv_cache_tokens=max(batches) * (prompt_len + steps + 32)))
    return profile_decode_steps(engine, batches, prompt_len, steps), engine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench roofline")
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = measure_copy_bandwidth()
    peak = {d: measure_matmul_peak(getattr(torch, d)) for d in ("bfloat16", "float32")}
    times, engine = decode_step_times(args.model, args.dtype, batches, args.prompt_len,
                                      args.steps, args.threads)
    from adrenaline.engine.kv_pool import kv_bytes_per_token

    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    params = sum(p.numel() for p in engine.model.parameters())
    kv_token = kv_bytes_per_token(engine.model_config, engine.dtype)
    seq = args.prompt_len + args.steps // 2  # mean context during the timed steps
    rows = []
    for b, t in times.items():
        bytes_read = weights + b * seq * kv_token
        flops = 2 * params * b  # matmuls dominate; attention adds ~4 * seq * hidden per layer
        rows.append({"batch": b, "step_ms": t * 1e3, "tok_s": b / t,
                     "bytes_per_step": bytes_read, "achieved_gbs": bytes_read / t / 1e9,
                     "bandwidth_share": bytes_read / t / 1e9 / bandwidth,
                     "achieved_gflops": flops / t / 1e9,
                     "matmul_peak_share": flops / t / 1e9 / peak[args.dtype]})
    result = {**result_header("roofline"), "threads": args.threads, "model": args.model,
              "dtype": args.dtype, "copy_bandwidth_gbs": bandwidth,
              "matmul_peak_gflops": peak, "weight_bytes": weights, "rows": rows}
    print(f"\nroofline: {args.model} {args.dtype}, {args.threads} threads; copy bandwidth "
          f"{bandwidth:.1f} GB/s, matmul peak bf16 {peak['bfloat16']:.0f} / fp32 "
          f"{peak['float32']:.0f} GFLOP/s, weights {weights / 1e6:.0f} MB")
    print_table(rows, [("step_ms", "step ms", 9, 1), ("tok_s", "tok/s", 8, 0),
                       ("achieved_gbs", "GB/s", 7, 1), ("bandwidth_share", "of bw", 7, 2),
                       ("achieved_gflops", "GFLOP/s", 9, 0), ("matmul_peak_share", "of peak", 9, 2)],
                label=("batch", 6))
    write_result(result, args.out)
    return result
