"""Model runner: turns a SchedulerOutput into tensors, runs the model, samples."""

from __future__ import annotations

import torch

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.kv_pool import KVPool
from adrenaline.engine.prompt_logprobs import compute_prompt_logprobs, wants_prompt_logprobs
from adrenaline.engine.remote_attention import ExecutorsLostError, RemoteAttention
from adrenaline.engine.request import sampled_requests
from adrenaline.engine.sampler import Sampler
from adrenaline.engine.scheduler import SchedulerOutput
from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.model.llama import LlamaModel
from adrenaline.transport.mesh import PeerLostError


class ModelRunner:
    def __init__(self, model: LlamaModel, backend: AttentionBackend, pool: KVPool,
                 block_manager: BlockManager, sampler: Sampler, device: torch.device):
        # Set by a decode worker that offloads: attention of offloaded requests runs there.
        self.remote: RemoteAttention | None = None
        # Set by EngineCore on CUDA (engine/cuda_graphs.py): captured all-local decode steps,
        # and per-layer segments for decode steps with offloaded requests.
        self.graphs = None
        self.piecewise = None
        # The pool's scratch block (past the block manager's range): padding rows write there.
        self.scratch_block = block_manager.num_blocks
        self.model = model
        self.backend = backend
        self.pool = pool
        self.bm = block_manager
        self.sampler = sampler
        self.device = device

    def build_inputs(self, step: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's flat input ids and positions."""
        ids: list[int] = []
        positions: list[int] = []
        for req, qlen, ctx in zip(step.requests, step.query_lens, step.context_lens):
            ids.extend(req.token_ids[ctx:ctx + qlen])
            positions.extend(range(ctx, ctx + qlen))
        return (torch.tensor(ids, dtype=torch.int64, device=self.device),
                torch.tensor(positions, dtype=torch.int64, device=self.device))

    def build_metadata(self, step: SchedulerOutput, rows: list[int]) -> AttentionMetadata:
        """Attention metadata for the step's requests at ``rows`` (the ones attended here)."""
        return AttentionMetadata.build(
            is_prefill=step.is_prefill, query_lens=[step.query_lens[i] for i in rows],
            context_lens=[step.context_lens[i] for i in rows],
            block_tables=[self.bm.block_table(step.requests[i].request_id) for i in rows],
            block_size=self.bm.block_size, device=self.device)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[list[int], list[dict[int, float] | None]]:
        """Run one step; returns the next token (and logprobs) of every request it samples
        (``sampled_requests``: an n-choice request's choices in its place)."""
        local = [i for i, r in enumerate(step.requests) if not r.is_offloaded]
        if (self.graphs is not None and not step.is_prefill and len(local) == len(step.requests)
                and len(local) <= self.graphs.max_batch):
            return self.sampler(self._replay_decode(step), step.requests)
        if (self.piecewise is not None and not step.is_prefill and len(local) < len(step.requests)
                and len(step.requests) <= self.piecewise.max_batch):
            return self.sampler(self._replay_offloaded(step, local), step.requests)
        input_ids, positions = self.build_inputs(step)
        if len(local) == len(step.requests):
            attention = self._local_attention(self.build_metadata(step, local))
        else:  # decode step with offloaded requests (they are never prefilled here)
            attention = self._split_attention(step, local)
        hidden = self._with_remote(lambda: self.model(input_ids, positions, attention))
        if step.is_prefill and any(map(wants_prompt_logprobs, step.requests)):
            compute_prompt_logprobs(self.model.compute_logits, hidden, step.requests,
                                    step.query_lens, step.context_lens)
        last = torch.tensor(step.query_lens, device=self.device).cumsum(0) - 1
        if any(r.choices for r in step.requests):  # n choices: the row repeated n times
            last = last.repeat_interleave(torch.tensor(
                [len(r.choices or (r,)) for r in step.requests], device=self.device))
        logits = self.model.compute_logits(hidden[last])
        return self.sampler(logits, sampled_requests(step.requests))

    def _replay_decode(self, step: SchedulerOutput) -> torch.Tensor:
        """A decode step (one new token per request) through the captured graphs: logits [n, V]."""
        ctx = list(step.context_lens)
        return self.graphs.run([r.token_ids[c] for r, c in zip(step.requests, ctx)], ctx, ctx,
                               [self.bm.block_table(r.request_id) for r in step.requests])

    def _replay_offloaded(self, step: SchedulerOutput, local: list[int]) -> torch.Tensor:
        """A decode step with offloaded requests through the piecewise graphs: logits [n, V]."""
        ctx = list(step.context_lens)
        bucket = self.piecewise.bucket_for(len(step.requests))
        self.piecewise.ensure(bucket)  # capture (first use) before the executors get this step
        attention = self._split_attention(step, local, pad_to=bucket)
        return self._with_remote(lambda: self.piecewise.run(
            [r.token_ids[c] for r, c in zip(step.requests, ctx)], ctx, attention))

    def _with_remote(self, forward):
        """Run a forward pass; with executors, end their step, or on a lost one abandon it.

        A step that fails changes no request (tokens are appended only after it), so it
        can be retried: ExecutorsLostError names the executors to replace first.
        """
        if self.remote is None:
            return forward()
        try:
            out = forward()
            self.remote.end_step()
            return out
        except PeerLostError as e:
            raise ExecutorsLostError(self.remote.abandon_step(e.peer)) from e
        except BaseException:  # any other failure: keep the executors in step, then raise
            abandon = getattr(self.remote, "abandon_step", None)
            try:
                abandon(None) if abandon is not None else self.remote.end_step()
            except Exception:
                pass
            raise

    def _local_attention(self, meta: AttentionMetadata):
        self.backend.prepare(meta)
        pool = self.pool

        def attention(layer: int, q, k, v):
            return self.backend.forward(q, k, v, pool.k[layer], pool.v[layer], meta)

        return attention

    def _split_attention(self, step: SchedulerOutput, local: list[int], pad_to: int | None = None):
        """Per layer: post each executor its rows' q, k, v; attend local rows; merge in order.

        With ``pad_to``, rows len(step.requests)..pad_to-1 are padding: attended locally,
        on the scratch block, at position 0.
        """
        if self.remote is None:
            raise RuntimeError("offloaded requests in a step, but no remote attention is set")
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(step.requests):
            if r.is_offloaded:
                groups.setdefault(r.executor, []).append(i)
        self.remote.begin_step({e: [step.requests[i] for i in rows] for e, rows in groups.items()})
        index = {e: torch.tensor(rows, device=self.device) for e, rows in groups.items()}
        pads = list(range(len(step.requests), pad_to or 0))
        local_index = torch.tensor(local + pads, dtype=torch.int64, device=self.device)
        local_attention = None
        if local or pads:
            meta = AttentionMetadata.build(
                is_prefill=False, query_lens=[1] * (len(local) + len(pads)),
                context_lens=[step.context_lens[i] for i in local] + [0] * len(pads),
                block_tables=[self.bm.block_table(step.requests[i].request_id) for i in local]
                + [[self.scratch_block]] * len(pads),
                block_size=self.bm.block_size, device=self.device)
            local_attention = self._local_attention(meta)

        def attention(layer: int, q, k, v):
            pending = {e: self.remote.start(e, q[ix], k[ix], v[ix]) for e, ix in index.items()}
            out = torch.empty_like(q)
            if local_attention is not None:  # overlaps the executors' work
                out[local_index] = local_attention(layer, q[local_index], k[local_index],
                                                   v[local_index])
            for e, p in pending.items():
                out[index[e]] = self.remote.finish(p)
            return out

        return attention
