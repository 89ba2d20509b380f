"""Stage env: torch / CUDA / device / flashinfer / cupy versions."""

from __future__ import annotations

import torch

from adrenaline.bench.gpu_check.common import Plan


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
