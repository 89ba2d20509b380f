"""Model runner: turns a SchedulerOutput into tensors, runs the model, samples."""

from __future__ import annotations

import torch

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.kv_pool import KVPool
from adrenaline.engine.sampler import Sampler
from adrenaline.engine.scheduler import SchedulerOutput
from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, backend: AttentionBackend, pool: KVPool,
                 block_manager: BlockManager, sampler: Sampler, device: torch.device):
        self.model = model
        self.backend = backend
        self.pool = pool
        self.bm = block_manager
        self.sampler = sampler
        self.device = device

    def build_inputs(self, step: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's flat input ids and positions, and its attention metadata."""
        ids: list[int] = []
        positions: list[int] = []
        for req, qlen, ctx in zip(step.requests, step.query_lens, step.context_lens):
            ids.extend(req.token_ids[ctx:ctx + qlen])
            positions.extend(range(ctx, ctx + qlen))
        meta = AttentionMetadata.build(
            is_prefill=step.is_prefill, query_lens=step.query_lens, context_lens=step.context_lens,
            block_tables=[self.bm.block_table(r.request_id) for r in step.requests],
            block_size=self.bm.block_size, device=self.device)
        return (torch.tensor(ids, dtype=torch.int64, device=self.device),
                torch.tensor(positions, dtype=torch.int64, device=self.device), meta)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[list[int], list[dict[int, float] | None]]:
        """Run one step; returns the next token (and logprobs) of every request in it."""
        input_ids, positions, meta = self.build_inputs(step)
        self.backend.prepare(meta)
        pool = self.pool

        def attention(layer: int, q, k, v):
            return self.backend.forward(q, k, v, pool.k[layer], pool.v[layer], meta)

        hidden = self.model(input_ids, positions, attention)
        last = torch.tensor(step.query_lens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])
        return self.sampler(logits, step.requests)
