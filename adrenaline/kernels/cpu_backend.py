"""CPU attention backend: decode reads KV pages in place with a compiled kernel.

Same page layout and prefill as the torch backend (kernels/torch_backend.py), which
stays the oracle it is tested against. Decode calls csrc/paged_decode.cpp: per
sequence and KV head, the group's query heads are scored block by block, with no
gathered copy of the keys and values, in float32 with an online softmax over
128-position chunks. So a decode step reads each KV byte once, where the torch path
copies it and reads the copy, and a sequence's output is the same bit for bit
whatever its batch or the block size (tests/unit/test_cpu_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline.kernels.cpu_extension import paged_decode_module
from adrenaline.kernels.torch_backend import TorchAttention

HEAD_DIMS = (64, 128)  # the kernel's instantiations
MAX_GROUP = 8  # query heads per KV head
DTYPES = (torch.float32, torch.bfloat16)


def unsupported(num_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype | None) -> str | None:
    """None where the kernel has an instantiation for these heads and dtype (None: any of
    DTYPES); otherwise why not."""
    if dtype is not None and dtype not in DTYPES:
        return f"dtype {dtype} (kernel: float32, bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (kernel: {HEAD_DIMS})"
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return f"{num_heads} query heads over {num_kv_heads} KV heads (at most {MAX_GROUP} per group)"
    return None


@dataclass
class _PagedDecodeState:
    tables: torch.Tensor  # [B, W] int32
    lens: torch.Tensor  # [B] int64: keys per sequence, this step's token included


class CpuAttention(TorchAttention):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 dtype: torch.dtype | None = None):
        reason = unsupported(num_heads, num_kv_heads, head_dim, dtype)
        if reason is not None:
            raise ValueError(f"attention_backend cpu: no kernel for {reason}")
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self._kernel = paged_decode_module().paged_decode

    def prepare(self, meta) -> None:
        if meta.is_prefill:
            super().prepare(meta)
            return
        meta.backend_state = _PagedDecodeState(tables=meta.block_tables.to(torch.int32),
                                               lens=meta.seq_lens.to(torch.int64))

    def _decode(self, q, k_cache, v_cache, meta):
        st: _PagedDecodeState = meta.backend_state
        return self._kernel(q, k_cache, v_cache, st.tables, st.lens, self.scale)
