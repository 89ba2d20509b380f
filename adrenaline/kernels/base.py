"""The one attention interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from adrenaline.kernels.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Paged attention over a batch of sequences.

    Contract: ``prepare(meta)`` is called once per step before any layer and
    may precompute indices or plans into ``meta.backend_state``. ``forward``
    is called once per layer: it first writes the step's new ``k``/``v``
    ([num_tokens, num_kv_heads, head_dim]) into the layer's pages at
    ``meta.slot_mapping``, then returns causal attention of ``q``
    ([num_tokens, num_heads, head_dim]) over each sequence's cached plus new
    tokens, as [num_tokens, num_heads, head_dim] in q's dtype. Pages have the
    backend's own layout, ``kv_cache_shape``.
    """

    # Which dimension of a page tensor indexes blocks (KV handoff copies whole blocks along it).
    block_dim: int = 0
    # Whether make_graph_state / plan_graph_state / forward_graph exist (engine/cuda_graphs.py).
    supports_cuda_graphs: bool = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's key (and value) pages; the layout is the backend's own."""

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor: ...

