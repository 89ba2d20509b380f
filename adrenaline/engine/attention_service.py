"""Executor side of attention offloading: a KV pool and attention, no model weights.

An AttentionService holds the KV of offloaded requests (adopted from a
prefill worker's handoff) and serves decode steps: for each step it learns
which of its requests are in the batch, then per layer appends their new
k, v and returns their attention output. Requests are known by integer
handles it assigns; the router frees them by request id (``free_request``), which
also covers a request cancelled while its adopt was still in flight (a tombstone
makes the late adopt drop its KV). ``lock`` guards the block manager: adopt/free calls and
the per-decode-worker service threads may run concurrently; pool writes of
different requests touch disjoint blocks.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import torch

from adrenaline.config import EngineConfig, ModelConfig
from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.kv_pool import KVPool, kv_bytes_per_token, num_blocks_for_budget
from adrenaline.engine.kv_transfer import import_blocks
from adrenaline.engine.layer_pacer import LayerPacer
from adrenaline.engine.remote_attention import TAG_HEADER, TAG_META, TAG_OUT, TAG_QKV
from adrenaline.engine.tombstones import Tombstones
from adrenaline.kernels import make_attention_backend
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.transport.base import Communicator


class AttentionService:
    def __init__(self, model: ModelConfig, config: EngineConfig, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.config = config
        self.dtype = dtype
        self.device = device
        self.backend = make_attention_backend(config.attention_backend, device,
                                              model.num_attention_heads, model.num_key_value_heads,
                                              model.head_dim, dtype)
        self.num_kv_blocks = num_blocks_for_budget(config, model, dtype)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size)
        self.pool = KVPool(model.num_hidden_layers, self.num_kv_blocks, config.block_size,
                           self.backend, dtype, device)
        self.lock = threading.Lock()
        self._handles = itertools.count()
        self.ids: dict[int, str] = {}  # handle -> request id
        self.handles: dict[str, int] = {}  # request id -> handle (inverse of ids)
        self._cancelled = Tombstones()  # freed before their adopt arrived
        self.num_steps = 0
        self.num_requests_served = 0  # request-steps, for metrics
        self.kv_bytes_read = 0  # KV bytes attention read (all layers): bandwidth use
        self.busy_s = 0.0  # time spent computing (not waiting for messages)
        self.busy_cpu_s = 0.0  # the computing thread's own CPU time in it (the rest: preempted)
        # The serving threads' CPU time in serve_step, waits included: minus busy_cpu_s, the
        # CPU spent polling for messages.
        self.serve_cpu_s = 0.0
        # Nap between a step's layers (LayerPacer) before polling: CPU executors, whose
        # core is shared; executor.pace_layers may turn it off.
        self.pace_layers = device.type == "cpu"
        self._pacers: dict[int, LayerPacer] = {}  # per decode rank served

    @property
    def capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.config.block_size

    def adopt(self, request_id: str, num_tokens: int, num_computed: int, kv: torch.Tensor) -> int:
        """Take in a prefilled request's KV; returns its handle. Blocks cover ``num_tokens``.

        Returns -1 (and holds nothing) when the request was freed before it arrived.
        """
        with self.lock:
            if self._cancelled.consume(request_id):
                return -1
            handle = next(self._handles)
            key = str(handle)
            blocks = self.block_manager.allocate(key, num_tokens)
            try:
                import_blocks(self.pool, self.backend.block_dim,
                              blocks[:self.block_manager.blocks_for(num_computed)], kv)
            except Exception:
                self.block_manager.free(key)
                raise
            self.ids[handle] = request_id
            self.handles[request_id] = handle
            return handle

    def free(self, handle: int) -> None:
        with self.lock:
            request_id = self.ids.pop(handle, None)
            if request_id is not None:
                self.handles.pop(request_id, None)
                self.block_manager.free(str(handle))

    def free_request(self, request_id: str) -> None:
        """Free a request's pages; if its adopt has not arrived yet, drop it on arrival."""
        with self.lock:
            handle = self.handles.pop(request_id, None)
            if handle is None:
                self._cancelled.add(request_id)
                return
            del self.ids[handle]
            self.block_manager.free(str(handle))

    def serve_step(self, comm: Communicator, src: int) -> None:
        """Serve one decode step of rank ``src`` (blocks until its header arrives)."""
        cpu = time.thread_time()
        try:
            self._serve_step(comm, src)
        finally:
            self.serve_cpu_s += time.thread_time() - cpu

    @property
    def napped_s(self) -> float:
        """Time the serving threads napped between layers (their core given back)."""
        return sum(p.napped_s for p in list(self._pacers.values()))

    def _serve_step(self, comm: Communicator, src: int) -> None:
        pacer = self._pacers.setdefault(src, LayerPacer())
        header = torch.empty(1, dtype=torch.int64)
        comm.recv(header, src, TAG_HEADER)
        n = int(header[0])
        meta = torch.empty(n, 2, dtype=torch.int64)
        comm.recv(meta, src, TAG_META)
        step = self.begin_step(meta[:, 0].tolist(), meta[:, 1].tolist())
        hq, hkv, d = (self.model.num_attention_heads, self.model.num_key_value_heads,
                      self.model.head_dim)
        packed = torch.empty(n, (hq + 2 * hkv) * d, dtype=self.dtype, device=self.device)
        for layer in range(self.model.num_hidden_layers):
            if layer and self.pace_layers:
                pacer.wait(lambda: comm.recv(packed, src, TAG_QKV))
            else:
                comm.recv(packed, src, TAG_QKV)
            q, k, v = packed.split([hq * d, hkv * d, hkv * d], dim=1)
            out = self.attend(step, layer, q.reshape(n, hq, d), k.reshape(n, hkv, d),
                              v.reshape(n, hkv, d))
            comm.send(out.contiguous(), src, TAG_OUT)
        self.end_step(step)

    # The step's three parts, also called in-line by a decode engine in the same process
    # (engine/inline_attention.py): begin_step once, attend once per layer in order, end_step.

    def begin_step(self, handles: list[int], lens: list[int]) -> "ExecutorStep":
        """Room for this step's token of each request (``lens``: tokens incl. the new one)."""
        start, cpu = time.perf_counter(), time.thread_time()
        with self.lock:
            for h, length in zip(handles, lens):
                self.block_manager.append(str(h), length)
            tables = [list(self.block_manager.block_table(str(h))) for h in handles]
        meta = AttentionMetadata.build(is_prefill=False, query_lens=[1] * len(handles),
                                       context_lens=[length - 1 for length in lens],
                                       block_tables=tables, block_size=self.config.block_size,
                                       device=self.device)
        self.backend.prepare(meta)
        self.busy_s += time.perf_counter() - start
        self.busy_cpu_s += time.thread_time() - cpu
        return ExecutorStep(meta, list(lens))

    def attend(self, step: "ExecutorStep", layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Append this layer's k, v for the step's requests and return their attention."""
        start, cpu = time.perf_counter(), time.thread_time()
        out = self.backend.forward(q, k, v, self.pool.k[layer], self.pool.v[layer], step.meta)
        self.busy_s += time.perf_counter() - start
        self.busy_cpu_s += time.thread_time() - cpu
        return out

    def end_step(self, step: "ExecutorStep") -> None:
        self.num_steps += 1
        self.num_requests_served += len(step.lens)
        self.kv_bytes_read += sum(step.lens) * kv_bytes_per_token(self.model, self.dtype)


@dataclass
class ExecutorStep:
    meta: AttentionMetadata
    lens: list[int]
