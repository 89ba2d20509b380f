"""Copy whole KV blocks out of and into a KVPool (the prefill -> decode handoff).

The exported tensor is [2 * num_layers, *page shape with num_blocks along the
backend's block dim]: layer i's keys at row i, its values at row num_layers + i.
Both ends must use the same backend layout and dtype (checked on import).
"""

from __future__ import annotations

import torch

from adrenaline.engine.kv_pool import KVPool


def export_blocks(pool: KVPool, block_dim: int, blocks: list[int]) -> torch.Tensor:
    index = torch.tensor(blocks, dtype=torch.int64, device=pool.k[0].device)
    return torch.stack([c.index_select(block_dim, index) for c in pool.k + pool.v])


def import_blocks(pool: KVPool, block_dim: int, blocks: list[int], data: torch.Tensor) -> None:
    caches = pool.k + pool.v
    expected = list(caches[0].shape)
    expected[block_dim] = len(blocks)
    if data.dim() != len(expected) + 1 or data.shape[0] != len(caches) \
            or list(data.shape[1:]) != expected or data.dtype != caches[0].dtype:
        raise ValueError(f"KV import: got {tuple(data.shape)} {data.dtype}, expected "
                         f"({len(caches)}, {', '.join(map(str, expected))}) {caches[0].dtype}")
    index = torch.tensor(blocks, dtype=torch.int64, device=caches[0].device)
    for cache, part in zip(caches, data):
        cache.index_copy_(block_dim, index, part.to(cache.device))


def kv_export_shape(pool: KVPool, block_dim: int, num_blocks: int) -> tuple[int, ...]:
    """Shape of export_blocks' result for ``num_blocks`` blocks (the receiver preallocates it)."""
    shape = list(pool.k[0].shape)
    shape[block_dim] = num_blocks
    return (2 * len(pool.k), *shape)
