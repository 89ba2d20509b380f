"""AttentionExecutor: a Ray actor colocated with a prefill instance, serving offloaded attention.

It owns a KV pool carved from memory the prefill instance does not need and
a bounded share of the device (on CPU: its own torch thread budget). An
offloaded request's KV arrives once, from the colocated prefill worker;
afterwards every decode step of that request computes its attention here:
one service thread per decode worker follows that worker's fixed message
sequence (see engine/remote_attention.py). The router frees a request's
pages when it finishes or is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import logging
import threading

import torch

from adrenaline.actors.comm_thread import CommThread
from adrenaline.actors.pinning import pin_process
from adrenaline.engine.attention_service import AttentionService
from adrenaline.engine.core import resolve_device, resolve_model_dir
from adrenaline.engine.remote_attention import exchange_message_bytes
from adrenaline.model.hf_config import load_model_config
from adrenaline.model.loader import resolve_dtype
from adrenaline.engine.step_profile import profile_executor_attention
from adrenaline.engine.synthetic_batch import service_adopt
from adrenaline.engine.kv_audit import audit_kv
from adrenaline.protocol import KVReport, PrefillResult, WorkerMetrics
from adrenaline.app_config import AppArgs

log = logging.getLogger(__name__)


class AttentionExecutor:
    def __init__(self, args: AppArgs, index: int):
        self.index = index
        # The executor stands on its prefill instance's device: it runs on that one's cores.
        pin_process(args.prefill.cpus, "prefill.cpus")
        self.num_threads = args.executor.engine.num_threads or 1
        torch.set_num_threads(self.num_threads)
        model = load_model_config(resolve_model_dir(args.model))
        device = resolve_device(args.device)
        self.service = AttentionService(model, args.executor.engine,
                                        resolve_dtype(args.dtype, model, device), device)
        self.comm = CommThread()
        # A link's shm rings hold one decode step's per-layer message at the decode
        # engine's largest batch.
        self._ring_bytes = 2 * exchange_message_bytes(model, self.service.dtype,
                                                      args.decode.engine.max_num_seqs)
        self._threads: list[threading.Thread] = []
        if args.executor.sm_count is not None:  # issue 11: green-context stream still to do
            log.warning("executor.sm_count=%d is not applied yet: the executor's kernels "
                        "share all of the device's SMs", args.executor.sm_count)

    async def capacity_tokens(self) -> int:
        return self.service.capacity_tokens

    async def set_rank(self, rank: int, world_size: int) -> None:
        self.comm.start(rank, world_size)

    async def rendezvous_address(self, kind: str = "gloo") -> str:
        return self.comm.rendezvous_address(kind)

    async def node_id(self) -> str:
        return self.comm.node_id()

    async def link(self, kind: str, peer: int, init: str, host: bool, epoch: int) -> None:
        """Serve decode worker ``peer`` (in its ``epoch``) over a new two-rank world.

        The service thread is bound to this link: when the peer dies its world breaks,
        the thread ends, and a replacement gets a thread of its own on its own link.
        """
        pair = await self.comm.join(kind, init, host, self._ring_bytes)
        peer_rank = 1 if host else 0
        self.comm.comm.link(peer, pair, peer_rank, epoch)
        t = threading.Thread(target=self._serve, args=(pair, peer_rank, peer), daemon=True,
                             name=f"attn-serve-{peer}-{epoch}")
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, pair, peer_rank: int, peer: int) -> None:
        torch.set_num_threads(self.num_threads)  # per-thread setting in torch
        with torch.inference_mode():
            while True:
                try:
                    self.service.serve_step(pair, peer_rank)
                except Exception as e:  # a closed or broken world cannot be served further
                    log.warning("attention service for rank %d stopped: %s", peer, e)
                    return

    async def adopt(self, request_id: str, pre: PrefillResult, kv: torch.Tensor) -> int:
        """Take a prefilled request's KV from the colocated prefill worker; returns a handle.

        ``kv`` comes as a Ray object from the same node (shared memory, once per request):
        the service threads own this process's communicator receives, see CommThread.
        """
        return await asyncio.get_running_loop().run_in_executor(
            None, self.service.adopt, request_id, len(pre.token_ids), pre.num_computed, kv)

    async def profile_attention(self) -> float:
        """Start-up only: seconds of attention per KV token (all layers), by running it
        on synthetic requests with this executor's thread budget; the pool is left empty."""
        def run() -> float:
            torch.set_num_threads(self.num_threads)
            return profile_executor_attention(self.service)

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def adopt_synthetic(self, context: int) -> int:
        """Start-up only: a request of random KV (for timing the exchange); free it by handle."""
        return service_adopt(self.service, 1, context)[0]

    async def free(self, handle: int) -> None:
        self.service.free(handle)

    async def free_request(self, request_id: str) -> None:
        """Free a finished or cancelled request's pages, even if its adopt is still in flight."""
        self.service.free_request(request_id)

    async def check_kv(self) -> KVReport:
        """Audit: every page is owned by an adopted (not yet freed) request, or free."""
        s = self.service
        with s.lock:
            live = {str(h) for h in s.ids}
            return audit_kv("executor", self.index, s.block_manager, live, live)

    async def pid(self) -> int:
        return os.getpid()

    async def watch(self) -> None:
        """Never returns: the router keeps one call pending so Ray tells it when this dies."""
        await asyncio.Event().wait()

    async def metrics(self) -> WorkerMetrics:
        s = self.service
        return WorkerMetrics(role="executor", index=self.index, num_running=len(s.ids),
                             num_waiting=0, kv_blocks_used=s.block_manager.num_used_blocks,
                             kv_blocks_total=s.num_kv_blocks, num_steps=s.num_steps,
                             kv_bytes_read=s.kv_bytes_read, busy_s=s.busy_s)
