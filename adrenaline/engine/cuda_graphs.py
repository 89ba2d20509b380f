"""CUDA graphs for decode steps: one captured graph per batch-size bucket.

A decode step of n requests, all attended locally, replays the graph of the
smallest bucket B >= n instead of launching ~10 kernels per layer. The graph
reads its inputs from static buffers (token ids, positions, KV slots) and
the backend's fixed page-table buffers, and writes float32 logits [B, V].

Invariants:
* Rows n..B-1 are padding: token 0 at position 0, whose KV is written into
  the pool's scratch block (one block past the block manager's range, never
  handed out) and who attend to that block alone; their logits are dropped.
* Before each replay the backend re-plans the bucket's page table
  (plan_graph_state): host work plus copies into the fixed buffers, ordered
  before the replay on the same stream.
* Every graph shares one memory pool; buckets are captured largest first.

Offloaded steps (some attention on executors) and prefill steps run eagerly;
graphs bucketed by (local, offloaded) batch are not built.
"""

from __future__ import annotations

import torch

from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.model.llama import LlamaModel

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def graph_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in _BUCKETS if b < max_batch]
    return sizes + [max_batch]


def _load_padded(ids_buf: torch.Tensor, pos_buf: torch.Tensor, input_ids: list[int],
                 positions: list[int], b: int) -> None:
    """Fill the first b rows of the static id/position buffers; rows past the inputs get 0."""
    pad = b - len(input_ids)
    host = torch.tensor([list(input_ids) + [0] * pad, list(positions) + [0] * pad],
                        dtype=torch.int64)
    dev = host.to(ids_buf.device, non_blocking=True)
    ids_buf[:b].copy_(dev[0])
    pos_buf[:b].copy_(dev[1])


class DecodeGraphs:
    def __init__(self, model: LlamaModel, backend: AttentionBackend, pool, scratch_block: int,
                 max_batch: int, max_blocks_per_seq: int, device: torch.device):
        if not backend.supports_cuda_graphs or device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device and a backend that supports them")
        self.model = model
        self.backend = backend
        self.pool = pool
        self.block_size = pool.block_size
        self.scratch_block = scratch_block
        self.dtype = model.dtype
        self.device = device
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.slots = torch.full((b,), scratch_block * self.block_size, dtype=torch.int64,
                                device=device)
        self.states = {n: backend.make_graph_state(n, min(n * max_blocks_per_seq,
                                                          scratch_block + n))
                       for n in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture_all()

    def _forward(self, n: int) -> torch.Tensor:
        state, pool, slots = self.states[n], self.pool, self.slots[:n]

        def attention(layer: int, q, k, v):
            return self.backend.forward_graph(q, k, v, pool.k[layer], pool.v[layer], slots, state)

        hidden = self.model(self.input_ids[:n], self.positions[:n], attention)
        return self.model.compute_logits(hidden)

    def _padding_meta(self, n: int, context_lens: list[int], tables: list[list[int]]
                      ) -> AttentionMetadata:
        pad = n - len(context_lens)
        return AttentionMetadata.build(
            is_prefill=False, query_lens=[1] * n, context_lens=list(context_lens) + [0] * pad,
            block_tables=[list(t) for t in tables] + [[self.scratch_block]] * pad,
            block_size=self.block_size, device=self.device)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        mempool = torch.cuda.graph_pool_handle()
        for n in reversed(self.buckets):
            meta = self._padding_meta(n, [], [])
            self.slots[:n].copy_(meta.slot_mapping)
            self.backend.plan_graph_state(self.states[n], meta, self.dtype)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy inits stay out of the graph
                self._forward(n)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.logits[n] = self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], context_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """Logits [n, V] of one decode step of n = len(input_ids) <= max_batch requests."""
        n = len(input_ids)
        b = self.bucket_for(n)
        meta = self._padding_meta(b, context_lens, tables)
        _load_padded(self.input_ids, self.positions, input_ids, positions, b)
        self.slots[:b].copy_(meta.slot_mapping)
        self.backend.plan_graph_state(self.states[b], meta, self.dtype)
        self.graphs[b].replay()
        self.num_replays += 1
        return self.logits[b][:n]


class PiecewiseDecodeGraphs:
    """Decode steps with offloaded requests: per-layer graph segments around eager attention.

    The per-layer exchange with the executors needs host calls between layers,
    so such a step cannot be one graph. Segment 0 embeds and runs layer 0's
    pre-attention; segment i (1..L-1) runs layer i-1's post-attention and layer
    i's pre-attention; segment L runs layer L-1's post-attention, the final
    norm and the logits. Between segments the runner's split attention (local
    rows here, offloaded rows on the executors) runs eagerly, reading q/k/v
    from and writing ``attn_out`` into static buffers.

    Invariants: a bucket's segments depend only on the padded batch B, not on
    the local/offloaded split (the split lives in the eager attention); padding
    rows are local rows on the scratch block (as in DecodeGraphs); a bucket is
    captured on its first use, while no other thread launches work on this
    engine's stream (capture_error_mode="thread_local" leaves other threads,
    such as a colocated executor's, free to run). With ``capture=False``
    (CPU, tests) the segments run eagerly through the same buffers.
    """

    def __init__(self, model: LlamaModel, max_batch: int, device: torch.device,
                 capture: bool = True):
        cfg = model.cfg
        self.model = model
        self.device = device
        self.capture = capture and device.type == "cuda"
        self.buckets = graph_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        b, dt = self.max_batch, model.dtype
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=device)
        self.positions = torch.zeros(b, dtype=torch.int64, device=device)
        self.residual = torch.zeros(b, cfg.hidden_size, dtype=dt, device=device)  # layer input
        self.q = torch.zeros(b, hq, d, dtype=dt, device=device)
        self.k = torch.zeros(b, hkv, d, dtype=dt, device=device)
        self.v = torch.zeros(b, hkv, d, dtype=dt, device=device)
        self.attn_out = torch.zeros(b, hq, d, dtype=dt, device=device)
        self.segments: dict[int, list] = {}  # bucket -> L + 1 callables (replays or eager)
        self._logits: dict[int, torch.Tensor] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.num_replays = 0

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _segment(self, n: int, i: int):
        m, last = self.model, len(self.model.layers)

        def run():
            if i == 0:
                hidden = m.embed_tokens(self.input_ids[:n])
            else:
                hidden = m.layers[i - 1].post_attention(self.attn_out[:n], self.residual[:n])
            if i == last:
                return m.compute_logits(m.final_hidden(hidden))
            q, k, v = m.layers[i].pre_attention(hidden, self.positions[:n])
            self.residual[:n].copy_(hidden)
            self.q[:n].copy_(q)
            self.k[:n].copy_(k)
            self.v[:n].copy_(v)
            return None

        return run

    def ensure(self, n: int) -> list:
        """Bucket n's segments, captured on first use."""
        if n in self.segments:
            return self.segments[n]
        fns = [self._segment(n, i) for i in range(len(self.model.layers) + 1)]
        if not self.capture:
            self.segments[n] = fns
            return fns
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graphs
            for fn in fns:
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        replays = []
        for i, fn in enumerate(fns):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = fn()
            if out is not None:
                self._logits[n] = out
            replays.append(graph.replay)
        logits = self._logits[n]
        last_replay = replays[-1]
        replays[-1] = lambda: (last_replay(), logits)[1]
        self.segments[n] = replays
        return replays

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], attention) -> torch.Tensor:
        """Logits [n, V] of a decode step; ``attention(layer, q, k, v)`` sees the padded batch."""
        n = len(input_ids)
        b = self.bucket_for(n)
        segments = self.ensure(b)
        _load_padded(self.input_ids, self.positions, input_ids, positions, b)
        segments[0]()
        for layer in range(len(self.model.layers)):
            self.attn_out[:b].copy_(attention(layer, self.q[:b], self.k[:b], self.v[:b]))
            out = segments[layer + 1]()
        self.num_replays += 1
        return out[:n]
