"""Stage ceilings: device copy bandwidth (read + write) and bf16 matmul rate."""

from __future__ import annotations

import torch

from adrenaline.bench.gpu_check.common import Plan, time_median


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
