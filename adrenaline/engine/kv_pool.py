"""Per-layer paged KV storage, sized by a token or byte budget.

On CPU the budget stands for a GPU's HBM capacity: the pool holds exactly
floor(budget / block) blocks and the block manager hands out no more.

On a CPU the pages are in memory advised for transparent huge pages (2 MiB, where
the kernel grants them): a sequence's KV blocks lie anywhere in a pool of hundreds of
MiB, and with 4 KiB pages each block read starts with a TLB miss.
"""

from __future__ import annotations

import mmap

import torch

from adrenaline.config import ConfigError, EngineConfig, ModelConfig
from adrenaline.kernels.base import AttentionBackend

DEFAULT_KV_TOKENS = 65536


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * elem


def num_blocks_for_budget(engine: EngineConfig, model: ModelConfig, dtype: torch.dtype) -> int:
    """How many blocks the configured budget buys (the runtime fact the pool reports)."""
    if engine.kv_cache_bytes is not None:
        tokens = engine.kv_cache_bytes // kv_bytes_per_token(model, dtype)
        field = "kv_cache_bytes"
    else:
        tokens = engine.kv_cache_tokens or DEFAULT_KV_TOKENS
        field = "kv_cache_tokens"
    num_blocks = tokens // engine.block_size
    if num_blocks < 1:
        raise ConfigError(f"{field}: budget holds no {engine.block_size}-token KV block")
    return num_blocks


class KVPool:
    """One key and one value page tensor per layer, in the backend's layout."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, backend: AttentionBackend,
                 dtype: torch.dtype, device: torch.device | str, scratch_blocks: int = 0):
        # Blocks num_blocks.. are scratch (CUDA-graph padding writes there), never handed out.
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = backend.kv_cache_shape(num_blocks + scratch_blocks, block_size)
        self.k: list[torch.Tensor] = [zeroed_pages(shape, dtype, device)
                                      for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [zeroed_pages(shape, dtype, device)
                                      for _ in range(num_layers)]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


HUGE_PAGE = 2 << 20


def zeroed_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
                 ) -> torch.Tensor:
    """Zeroed pages; on a CPU, in anonymous memory advised for huge pages, starting at a
    huge-page boundary (the tensor keeps its mapping alive)."""
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: 4 KiB pages then
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    pages = raw[start:start + nbytes].view(dtype).view(shape)
    pages.zero_()  # fault every page in now, not in the first steps that write there
    return pages
