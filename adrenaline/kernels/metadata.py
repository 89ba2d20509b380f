"""Per-step attention metadata: built once per step by the runner, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """What one forward step asks of attention, for a batch of sequences.

    Invariants: the step's new tokens are laid out sequence after sequence
    (``cu_query_lens`` gives the boundaries); sequence i attends to its
    ``context_lens[i]`` cached tokens plus its own new tokens, causally;
    ``slot_mapping[t]`` is the flat KV slot (block * block_size + offset) the
    new token t is written to; ``block_tables[i]`` lists sequence i's blocks in
    order, padded with 0 past its last block. A decode step has exactly one
    query token per sequence.
    """

    is_prefill: bool
    query_lens: list[int]
    context_lens: list[int]
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context + query
    # Filled by the backend's prepare(); private to that backend.
    backend_state: Any = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())

    @property
    def max_seq_len(self) -> int:
        return max(c + q for c, q in zip(self.context_lens, self.query_lens)) if self.query_lens else 0

    @classmethod
    def build(cls, *, is_prefill: bool, query_lens: list[int], context_lens: list[int],
              block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Derive slots and padded tables from per-sequence block lists."""
        slots: list[int] = []
        for table, ctx, qlen in zip(block_tables, context_lens, query_lens):
            for pos in range(ctx, ctx + qlen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            is_prefill=is_prefill,
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_size=block_size,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(padded), width),
            seq_lens=torch.tensor([c + q for c, q in zip(context_lens, query_lens)],
                                  dtype=torch.int32, device=device),
        )
