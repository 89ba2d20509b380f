"""FlashInfer attention backend (CUDA only).

Page layout (this backend's own, flashinfer's "NHD"): each layer has a separate key
and value tensor of shape [num_blocks, block_size, num_kv_heads, head_dim],
contiguous, so flat slot s = block * block_size + offset is row s of the
[num_blocks * block_size, num_kv_heads, head_dim] view. New k/v are written by
index_copy_ at ``meta.slot_mapping``; attention reads pages through the CSR page
table (indptr / indices / last_page_len) built from ``block_tables`` and the
per-sequence lengths, passing (k_cache, v_cache) tuples to flashinfer.

The module imports without CUDA (flashinfer imports on CPU-only machines); only
constructing the backend needs a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import flashinfer
import torch

from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata

_WORKSPACE_BYTES = 128 * 1024 * 1024

_Wrapper = Union[flashinfer.BatchDecodeWithPagedKVCacheWrapper,
                 flashinfer.BatchPrefillWithPagedKVCacheWrapper]


@dataclass
class _FlashInferState:
    """One step's page table; indptr/last_page_len on host (plan() reads them there)."""

    qo_indptr: torch.Tensor  # [num_seqs + 1] int32, host: token boundaries of the step
    kv_indptr: torch.Tensor  # [num_seqs + 1] int32, host: boundaries into kv_indices
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32, device: pages in sequence order
    kv_last_page_len: torch.Tensor  # [num_seqs] int32, host: 1..block_size
    dtypes: tuple[torch.dtype, torch.dtype] | None = None  # (q, kv) dtypes it was planned for


@dataclass
class GraphDecodeState:
    """One CUDA-graph bucket's decode wrapper and the fixed buffers its kernels read."""

    batch_size: int
    max_pages: int
    wrapper: flashinfer.BatchDecodeWithPagedKVCacheWrapper
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # indptr, indices, last_page_len


class FlashInferAttention(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 *, device: torch.device | str = "cuda", dtype: torch.dtype | None = None):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("FlashInferAttention needs a CUDA device")
        # If the activation dtype is known up front, prepare() plans eagerly; otherwise
        # the first forward() of a step plans with q's dtype (plans need the dtype).
        self.dtype = dtype
        # One float workspace shared by both wrappers: their runs never overlap (one stream).
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # flashinfer's CUDA-core decode kernel is instantiated for query groups of 1-4, 6
        # and 8 heads only (seen on an H200: group 7 fails to plan); larger groups run the
        # tensor-core (prefill-kernel) decode, which takes any group and is faster there.
        self._decode_tensor_cores = num_heads // num_kv_heads > 4
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self._decode_tensor_cores)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        # A wrapper holds only its latest plan: _live[is_prefill] is the state that plan was
        # built from, so a meta whose plan was displaced by another meta's is re-planned.
        self._live: dict[bool, _FlashInferState | None] = {False: None, True: None}

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.num_seqs == 0:
            meta.backend_state = None
            return
        state = self._page_table(meta)
        meta.backend_state = state
        if self.dtype is not None:
            self._plan(meta, state, self.dtype, self.dtype)

    def _page_table(self, meta: AttentionMetadata) -> _FlashInferState:
        bs = meta.block_size
        seq_lens = [c + q for c, q in zip(meta.context_lens, meta.query_lens)]
        num_pages = [-(-n // bs) for n in seq_lens]
        width = meta.block_tables.shape[1]
        assert max(num_pages) <= width, "block_tables narrower than the sequences it covers"
        # Host-side CSR from the host lengths; only the page ids are gathered on device,
        # from row i's first num_pages[i] entries (the padding past them is never read).
        counts = torch.tensor(num_pages, dtype=torch.int64)
        kv_indptr = torch.zeros(meta.num_seqs + 1, dtype=torch.int64)
        kv_indptr[1:] = counts.cumsum(0)
        row_shift = torch.arange(meta.num_seqs, dtype=torch.int64) * width - kv_indptr[:-1]
        flat = torch.arange(int(kv_indptr[-1])) + torch.repeat_interleave(row_shift, counts)
        tables = meta.block_tables.to(self.device, non_blocking=True).reshape(-1)
        kv_indices = tables.index_select(0, flat.to(self.device, non_blocking=True)).to(torch.int32)
        kv_indptr = kv_indptr.to(torch.int32)
        qo_indptr = torch.zeros(meta.num_seqs + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.tensor(meta.query_lens, dtype=torch.int32).cumsum(0)
        last = torch.tensor([n - (p - 1) * bs for n, p in zip(seq_lens, num_pages)], dtype=torch.int32)
        return _FlashInferState(qo_indptr, kv_indptr, kv_indices, last)

    def _wrapper(self, meta: AttentionMetadata) -> _Wrapper:
        return self._prefill if meta.is_prefill else self._decode

    def _plan(self, meta: AttentionMetadata, st: _FlashInferState,
              q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        wrapper = self._wrapper(meta)
        if meta.is_prefill:
            # causal=True with kv_len >= q_len aligns the mask bottom-right: query token j of
            # sequence i sees the first context_lens[i] + j + 1 keys.
            wrapper.plan(st.qo_indptr, st.kv_indptr, st.kv_indices, st.kv_last_page_len,
                         self.num_heads, self.num_kv_heads, self.head_dim, meta.block_size,
                         causal=True, sm_scale=self.scale,
                         q_data_type=q_dtype, kv_data_type=kv_dtype)
        else:
            wrapper.plan(st.kv_indptr, st.kv_indices, st.kv_last_page_len,
                         self.num_heads, self.num_kv_heads, self.head_dim, meta.block_size,
                         sm_scale=self.scale, q_data_type=q_dtype, kv_data_type=kv_dtype)
        st.dtypes = (q_dtype, kv_dtype)
        self._live[meta.is_prefill] = st

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        nb, bs, h, d = k_cache.shape
        # Contiguous NHD pages: flat slot s is row s of the [nb*bs, h, d] view.
        k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        st: _FlashInferState | None = meta.backend_state
        if st is None:
            return q.new_empty(q.shape)
        wrapper = self._wrapper(meta)
        if self._live[meta.is_prefill] is not st or st.dtypes != (q.dtype, k_cache.dtype):
            # First layer of a step whose dtype was unknown at prepare(), or the wrapper was
            # re-planned for another meta in between: plan again (once per step normally).
            self._plan(meta, st, q.dtype, k_cache.dtype)
        return wrapper.run(q.contiguous(), (k_cache, v_cache))

    # ---- CUDA graphs (engine/cuda_graphs.py): decode steps of a fixed batch size

    supports_cuda_graphs = True

    def make_graph_state(self, batch_size: int, max_pages: int) -> GraphDecodeState:
        """A decode wrapper whose page table lives in fixed device buffers (graph-safe)."""
        dev = self.device
        indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=dev)
        indices = torch.zeros(max_pages, dtype=torch.int32, device=dev)
        last = torch.ones(batch_size, dtype=torch.int32, device=dev)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._decode_tensor_cores,
            paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
        return GraphDecodeState(batch_size, max_pages, wrapper, (indptr, indices, last))

    def plan_graph_state(self, state: GraphDecodeState, meta: AttentionMetadata,
                         dtype: torch.dtype) -> None:
        """Re-plan ``state`` for ``meta`` (a decode step of exactly ``state.batch_size`` seqs).

        Runs before each replay: plan() copies the page table into the fixed buffers
        the captured kernels read.
        """
        assert not meta.is_prefill and meta.num_seqs == state.batch_size
        st = self._page_table(meta)
        if st.kv_indices.numel() > state.max_pages:
            raise ValueError(f"graph page table holds {state.max_pages} pages, "
                             f"the step needs {st.kv_indices.numel()}")
        state.wrapper.plan(st.kv_indptr, st.kv_indices, st.kv_last_page_len,
                           self.num_heads, self.num_kv_heads, self.head_dim, meta.block_size,
                           sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)

    def forward_graph(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      state: GraphDecodeState) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return state.wrapper.run(q.contiguous(), (k_cache, v_cache))
