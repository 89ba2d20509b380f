"""Compile flashinfer's JIT modules for the GPU check's shapes, all at once, in parallel.

flashinfer compiles one module per (kind, dtype, head_dim, ...) on first use,
under a file lock, into FLASHINFER_WORKSPACE_BASE. Triggering every module
the check needs from its own process at start-up overlaps those compiles
with each other and with the check's first stages; the check then finds
them built (or waits on their locks).

    python -m adrenaline.bench.flashinfer_warmup            # all modules, one process each
    python -m adrenaline.bench.flashinfer_warmup decode 64  # one module (what each child runs)
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

HEAD_DIMS = (128, 64)
# decode: a 4-head query group (CUDA-core kernel); decode_tc: an 8-head group (tensor cores).
KINDS = ("decode", "decode_tc", "prefill")


def build_ops(head_dim: int) -> None:
    """The fused norm / activation / RoPE modules (kernels/flashinfer_ops.py)."""
    from adrenaline.kernels.flashinfer_ops import FlashInferOps
    from adrenaline.kernels.ops import RotaryEmbedding

    dev, dt = torch.device("cuda"), torch.bfloat16
    ops = FlashInferOps()
    x = torch.randn(4, 256, device=dev, dtype=dt)
    w = torch.ones(256, device=dev, dtype=dt)
    ops.rms_norm(x, w, 1e-5)
    ops.add_rms_norm(x.clone(), x.clone(), w, 1e-5)
    ops.silu_and_mul(x)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, dt, dev)
    q = torch.randn(4, 8, head_dim, device=dev, dtype=dt)
    ops.rope(rotary, torch.arange(4, device=dev), q, q[:, :2].clone())
    torch.cuda.synchronize()


def build_one(kind: str, head_dim: int) -> None:
    if kind == "ops":
        return build_ops(head_dim)
    from adrenaline.kernels.flashinfer_backend import FlashInferAttention
    from adrenaline.kernels.metadata import AttentionMetadata

    dev = torch.device("cuda")
    hq = 16 if kind == "decode_tc" else 8
    backend = FlashInferAttention(hq, 2, head_dim, device=dev, dtype=torch.bfloat16)
    qlen = 5 if kind == "prefill" else 1
    meta = AttentionMetadata.build(is_prefill=kind == "prefill", query_lens=[qlen],
                                   context_lens=[3], block_tables=[[0]], block_size=16, device=dev)
    backend.prepare(meta)
    shape = backend.kv_cache_shape(1, 16)
    kc = torch.zeros(shape, dtype=torch.bfloat16, device=dev)
    vc = torch.zeros_like(kc)
    q = torch.randn(qlen, hq, head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(qlen, 2, head_dim, device=dev, dtype=torch.bfloat16)
    backend.forward(q, k, k.clone(), kc, vc, meta)
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    if argv:
        start = time.perf_counter()
        build_one(argv[0], int(argv[1]))
        print(f"built {argv[0]} head_dim={argv[1]} in {time.perf_counter() - start:.1f}s", flush=True)
        return 0
    procs = [subprocess.Popen([sys.executable, "-m", __spec__.name, kind, str(d)])
             for kind in KINDS for d in HEAD_DIMS]
    procs.append(subprocess.Popen([sys.executable, "-m", __spec__.name, "ops", "64"]))
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
