"""Kernels: the attention interface and its backends, plus model and sampling ops."""

from __future__ import annotations

import logging

import torch

from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device, num_heads: int,
                              num_kv_heads: int, head_dim: int,
                              dtype: torch.dtype | None = None) -> str:
    """The backend a name stands for here: "auto" is flashinfer on CUDA; on the CPU, the
    compiled kernel (cpu) where it builds and has these heads, else torch (logged, with
    the reason). Other names stand for themselves."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flashinfer"
    return _cpu_choice(num_heads, num_kv_heads, head_dim, dtype)


def make_attention_backend(name: str, device: torch.device, num_heads: int, num_kv_heads: int,
                           head_dim: int, dtype: torch.dtype | None = None) -> AttentionBackend:
    """The backend by name (``resolve_attention_backend``)."""
    name = resolve_attention_backend(name, device, num_heads, num_kv_heads, head_dim, dtype)
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend: cpu needs the CPU, not {device.type}")
        from adrenaline.kernels.cpu_backend import CpuAttention
        return CpuAttention(num_heads, num_kv_heads, head_dim, dtype=dtype)
    if name == "torch":
        from adrenaline.kernels.torch_backend import TorchAttention
        return TorchAttention(num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("attention_backend: flashinfer needs a CUDA device")
        from adrenaline.kernels.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(num_heads, num_kv_heads, head_dim, device=device, dtype=dtype)
    raise ValueError(f"attention_backend: unknown backend {name!r} (auto, cpu, torch, flashinfer)")


def _cpu_choice(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype | None) -> str:
    from adrenaline.kernels.cpu_backend import unsupported
    from adrenaline.kernels.cpu_extension import unavailable_reason
    reason = unsupported(num_heads, num_kv_heads, head_dim, dtype) or unavailable_reason()
    if reason is None:
        return "cpu"
    log.warning("attention_backend auto: torch, not the CPU kernel (%s)", reason)
    return "torch"


__all__ = ["AttentionBackend", "AttentionMetadata", "make_attention_backend",
           "resolve_attention_backend"]
