"""Torch attention backend: the CPU path and the oracle every fast kernel is tested against.

Page layout (this backend's own): [num_kv_heads, num_blocks, block_size, head_dim],
head outermost, so gathering a sequence's blocks yields, per KV head, one
contiguous [seq_len, head_dim] matrix and decode attention is two batched
GEMMs with no transpose copies.

Decode pads sequences to a common length to batch them; a batch is split into
groups of similar lengths (``length_groups``) so that a step costs about the
sum of its sequences' lengths, not batch x the longest.

Batch invariance: a sequence's output does not depend on its group, its padding
or the batch beside it, bit for bit (tests/unit/test_torch_attention_groups.py),
so served greedy tokens equal the offline engine's whatever the batches. GEMM
and reduction kernels sum in an order that depends on the reduced length, so no
reduction here runs over the padded length: keys are cut into chunks of
``CHUNK_TOKENS`` at fixed positions, each chunk's scores, max, exp-sum and
probs x values are fixed-shape operations, and the chunks are combined (the
log-sum-exp rescaling of split-KV attention) by a sequential sum in which the
all-padding chunks past a sequence's end add exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F

from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata


@dataclass
class _DecodeGroup:
    """Sequences of a decode step attended together, padded to the longest of them."""

    rows: torch.Tensor | None  # [n] int64: their rows in the batch (None: the whole batch)
    num_seqs: int
    block_index: torch.Tensor  # [n * width] int64 (width: whole chunks), padded with block 0
    bias: torch.Tensor  # [1, n, chunks, 1, chunk tokens] float32: 0 or -inf
    # Gather buffers reused by every layer of the step: fresh multi-MB tensors per
    # layer cost more in page faults than the copy itself.
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class _DecodeState:
    groups: list[_DecodeGroup]


# Keys per chunk of decode attention (or one block, where blocks are larger). Measured on
# SmolLM2 (13 sequences of 300-2,300 tokens): 128 costs 4% over padding alone; 64 and 256
# cost more.
CHUNK_TOKENS = 128

# A group's fixed cost per step (its gathers, GEMMs and softmax over all layers), in KV
# blocks of attention work: measured on this project's CPU as about 2 ms for SmolLM2's 30
# layers against about 4 us per KV token, so 512 tokens (32 blocks of 16).
GROUP_COST_TOKENS = 512


def length_groups(num_blocks: list[int], group_cost_blocks: float) -> list[list[int]]:
    """Rows of a decode batch split into groups, each padded to its longest member.

    Padding the whole batch to its longest sequence makes a step's attention cost batch x
    longest, not the sum of the lengths; every extra group costs ``group_cost_blocks``.
    The split minimizing padded blocks + groups x cost, over the rows sorted by length
    (longest first; an optimal split is contiguous there), by dynamic programming.
    """
    order = sorted(range(len(num_blocks)), key=lambda i: (-num_blocks[i], i))
    lens = [num_blocks[i] for i in order]
    n = len(lens)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j rows (sorted)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 form the last group, padded to lens[i]
            c = best[i] + (j - i) * lens[i] + group_cost_blocks
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


@dataclass
class _PrefillState:
    # Runs of consecutive sequences with equal (query_len, context_len): (first, count, qlen, ctx).
    groups: list[tuple[int, int, int, int]]
    token_starts: list[int]


class TorchAttention(AttentionBackend):
    block_dim = 1

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (self.num_kv_heads, num_blocks, block_size, self.head_dim)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        h, nb, bs, d = k_cache.shape
        # k: [T, Hkv, D] -> [Hkv, T, D] to match the head-outermost pages.
        k_cache.view(h, nb * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.view(h, nb * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))

    def gather_kv(self, cache: torch.Tensor, block_index: torch.Tensor, num_seqs: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """[Hkv, NB, bs, D] pages -> [Hkv, num_seqs, max_blocks*bs, D] per-sequence keys."""
        h, _, bs, d = cache.shape
        if out is None:
            out = cache.new_empty(h, block_index.numel(), bs, d)
        torch.index_select(cache, 1, block_index, out=out.view(h, -1, bs, d))
        return out.view(h, num_seqs, -1, d)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.is_prefill:
            starts, acc = [], 0
            for q in meta.query_lens:
                starts.append(acc)
                acc += q
            keyed = list(enumerate(zip(meta.query_lens, meta.context_lens)))
            groups = []
            for (qlen, ctx), run in groupby(keyed, key=lambda x: x[1]):
                run = list(run)
                groups.append((run[0][0], len(run), qlen, ctx))
            meta.backend_state = _PrefillState(groups=groups, token_starts=starts)
            return
        bs = meta.block_size
        chunk_tokens = max(CHUNK_TOKENS, bs)  # block sizes are powers of two
        chunk = chunk_tokens // bs  # blocks per chunk
        num_blocks = [-(-(c + 1) // bs) for c in meta.context_lens]
        rows = length_groups(num_blocks, GROUP_COST_TOKENS / bs)
        tables, seq_lens = meta.block_tables.to(torch.int64), meta.seq_lens
        groups = []
        for members in rows:
            width = -(-max(num_blocks[i] for i in members) // chunk) * chunk  # whole chunks
            at = (None if len(rows) == 1 else
                  torch.tensor(members, dtype=torch.int64, device=seq_lens.device))
            index = tables if at is None else tables[at]
            lens = seq_lens if at is None else seq_lens[at]
            if index.shape[1] >= width:
                index = index[:, :width]
            else:  # the table is narrower than whole chunks: pad with block 0 (masked)
                index = F.pad(index, (0, width - index.shape[1]))
            positions = torch.arange(width * bs, dtype=torch.int32, device=seq_lens.device)
            bias = torch.zeros(len(members), width * bs, dtype=torch.float32,
                               device=seq_lens.device)
            bias.masked_fill_(positions[None, :] >= lens[:, None], float("-inf"))
            groups.append(_DecodeGroup(rows=at, num_seqs=len(members),
                                       block_index=index.reshape(-1),
                                       bias=bias.view(1, len(members), width // chunk, 1,
                                                 chunk_tokens)))
        meta.backend_state = _DecodeState(groups=groups)

    def forward(self, q, k, v, k_cache, v_cache, meta):
        self.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, k_cache, v_cache, meta)
        return self._decode(q, k_cache, v_cache, meta)

    def _decode(self, q, k_cache, v_cache, meta):
        st: _DecodeState = meta.backend_state
        if len(st.groups) == 1:
            return self._decode_group(q, k_cache, v_cache, meta.block_size, st.groups[0])
        out = q.new_empty(q.shape)
        for g in st.groups:
            out.index_copy_(0, g.rows, self._decode_group(q.index_select(0, g.rows), k_cache,
                                                          v_cache, meta.block_size, g))
        return out

    def _decode_group(self, q, k_cache, v_cache, block_size: int, st: _DecodeGroup):
        b, g, hkv, d = st.num_seqs, self.num_heads // self.num_kv_heads, self.num_kv_heads, \
            self.head_dim
        if st.keys is None or st.keys.dtype != k_cache.dtype:
            shape = (hkv, st.block_index.numel(), block_size, d)
            st.keys = k_cache.new_empty(shape)
            st.values = v_cache.new_empty(shape)
        keys = self.gather_kv(k_cache, st.block_index, b, st.keys)  # [Hkv, B, L, D]
        values = self.gather_kv(v_cache, st.block_index, b, st.values)
        n, c = st.bias.shape[2], st.bias.shape[4]  # chunks, keys per chunk
        keys = keys.view(hkv, b, n, c, d)
        values = values.view(hkv, b, n, c, d)
        # q: [B, Hq, D] -> [Hkv, B, 1, G, D]; query head h*G+i reads KV head h.
        qh = q.view(b, hkv, g, d).transpose(0, 1).unsqueeze(2)
        # Per chunk (module docstring): [Hkv, B, n, G, C] scores, max, exp, sum.
        scores = torch.matmul(qh, keys.transpose(-1, -2)).float() * self.scale
        scores += st.bias
        peak = scores.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).min)
        probs = torch.exp(scores - peak)  # an all-padding chunk: all 0 (its peak is finite)
        total = probs.sum(dim=-1, keepdim=True)  # [Hkv, B, n, G, 1]
        part = torch.matmul(probs.to(q.dtype), values).float()  # [Hkv, B, n, G, D]
        # Combine the chunks: rescale each to the sequence's max; the sums run in chunk
        # order (cumsum is sequential), so trailing all-padding chunks add exact zeros.
        scale = torch.exp(peak - peak.amax(dim=2, keepdim=True))
        out = (part * scale).cumsum(dim=2)[:, :, -1] / (total * scale).cumsum(dim=2)[:, :, -1]
        return out.to(q.dtype).transpose(0, 1).reshape(b, self.num_heads, d)

    def _prefill(self, q, k, v, k_cache, v_cache, meta):
        st: _PrefillState = meta.backend_state
        out = torch.empty_like(q)
        for first, count, qlen, ctx in st.groups:
            start = st.token_starts[first]
            end = start + count * qlen
            # [count*qlen, H, D] -> [count, H, qlen, D]
            qs = q[start:end].view(count, qlen, self.num_heads, self.head_dim).transpose(1, 2)
            if ctx == 0:
                ks = k[start:end].view(count, qlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
                vs = v[start:end].view(count, qlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                                   enable_gqa=True)
            else:
                o = self._prefill_with_context(qs, k_cache, v_cache, meta, first, count, qlen, ctx)
            out[start:end] = o.transpose(1, 2).reshape(count * qlen, self.num_heads, self.head_dim)
        return out

    def _prefill_with_context(self, qs, k_cache, v_cache, meta, first, count, qlen, ctx):
        """New tokens attend to cached context plus themselves (read back from pages)."""
        total = ctx + qlen
        nblocks = -(-total // meta.block_size)
        index = meta.block_tables[first:first + count, :nblocks].to(torch.int64).reshape(-1)
        keys = self.gather_kv(k_cache, index, count)[:, :, :total].transpose(0, 1)  # [n, Hkv, L, D]
        values = self.gather_kv(v_cache, index, count)[:, :, :total].transpose(0, 1)
        key_pos = torch.arange(total, device=qs.device)
        query_pos = torch.arange(ctx, total, device=qs.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [qlen, L]
        return F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scale,
                                              enable_gqa=True)
