"""Kernels: the attention interface and its backends, plus model and sampling ops."""

from __future__ import annotations

import torch

from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata


def make_attention_backend(name: str, device: torch.device, num_heads: int, num_kv_heads: int,
                           head_dim: int, dtype: torch.dtype | None = None) -> AttentionBackend:
    """Pick a backend by name; "auto" is flashinfer on CUDA, torch elsewhere."""
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" else "torch"
    if name == "torch":
        from adrenaline.kernels.torch_backend import TorchAttention
        return TorchAttention(num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("attention_backend: flashinfer needs a CUDA device")
        from adrenaline.kernels.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(num_heads, num_kv_heads, head_dim, device=device, dtype=dtype)
    raise ValueError(f"attention_backend: unknown backend {name!r} (auto, torch, flashinfer)")


__all__ = ["AttentionBackend", "AttentionMetadata", "make_attention_backend"]
