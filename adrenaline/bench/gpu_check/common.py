"""What every stage shares: the plan (sizes for a GPU or the CPU dry run), timing,
the attention backend under test and the random checkpoint.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
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


def backend_under_test(plan: Plan, hq: int, hkv: int, d: int, dtype: torch.dtype):
    from adrenaline.kernels import make_attention_backend
    name = "torch" if plan.dry_run else "flashinfer"
    return make_attention_backend(name, plan.device, hq, hkv, d, dtype)


def model_dir(plan: Plan, ctx: dict) -> Path:
    if "model_dir" not in ctx:
        from adrenaline.model.builtin import write_random_checkpoint
        root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        ctx["model_dir"] = write_random_checkpoint(root / "llama", plan.model)
    return ctx["model_dir"]
