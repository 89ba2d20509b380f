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
import logging
import threading

import torch

from adrenaline.actors.pinning import pin_process
from adrenaline.actors.worker import Worker
from adrenaline.engine.attention_service import AttentionService
from adrenaline.engine.core import resolve_device
from adrenaline.engine.remote_attention import EXCHANGE_SPIN_S, exchange_message_bytes
from adrenaline.model.hf_config import load_model_config
from adrenaline.model.loader import resolve_dtype
from adrenaline.model.resolve import resolve_model_dir
from adrenaline.engine.step_profile import profile_executor_attention
from adrenaline.engine.synthetic_batch import service_adopt
from adrenaline.engine.kv_audit import audit_kv
from adrenaline.protocol import KVReport, PrefillResult
from adrenaline.app_config import AppArgs

log = logging.getLogger(__name__)


class AttentionExecutor(Worker):
    role = "executor"

    def __init__(self, args: AppArgs, index: int):
        super().__init__(index)
        # The executor stands on its prefill instance's device: it runs on that one's cores.
        pin_process(args.prefill.cpus, "prefill.cpus", args.prefill.nice)
        self.num_threads = args.executor.engine.num_threads or 1
        torch.set_num_threads(self.num_threads)
        model = load_model_config(resolve_model_dir(args.model))
        device = resolve_device(args.device)
        self.service = AttentionService(model, args.executor.engine,
                                        resolve_dtype(args.dtype, model, device), device)
        # CPU only: on a GPU the cores are not scarce, and a receive posted late (NCCL)
        # would hold the decode's send; the pacing is untimed there.
        self.service.pace_layers = args.executor.pace_layers and device.type == "cpu"
        # A link's shm rings hold one decode step's per-layer message at the decode
        # engine's largest batch.
        self._exchange_bytes = 2 * exchange_message_bytes(model, self.service.dtype,
                                                          args.decode.engine.max_num_seqs)
        self._threads: list[threading.Thread] = []
        # CUDA with executor.sm_count: the service threads launch on a green-context stream
        # bound to that many SMs (the prefill worker on the same GPU keeps the rest).
        self._stream = None
        if args.executor.sm_count is not None and device.type == "cuda":
            self._stream = _green_stream(device, args.executor.sm_count)

    async def capacity_tokens(self) -> int:
        return self.service.capacity_tokens

    def _ring_bytes(self, peer: int) -> int:
        return self._exchange_bytes

    async def _linked(self, peer: int, pair, peer_rank: int, epoch: int) -> None:
        """Serve decode worker ``peer`` over the new link.

        The service thread is bound to this link: when the peer dies its world breaks,
        the thread ends, and a replacement gets a thread of its own on its own link.
        """
        pair.set_spin(EXCHANGE_SPIN_S)
        await super()._linked(peer, pair, peer_rank, epoch)
        t = threading.Thread(target=self._serve, args=(pair, peer_rank, peer), daemon=True,
                             name=f"attn-serve-{peer}-{epoch}")
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, pair, peer_rank: int, peer: int) -> None:
        torch.set_num_threads(self.num_threads)  # per-thread setting in torch
        if self._stream is not None:
            torch.cuda.set_stream(self._stream)  # this thread's current stream
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
        def adopt() -> int:
            handle = self.service.adopt(request_id, len(pre.token_ids), pre.num_computed, kv)
            if self._stream is not None:  # the service stream does not wait on this one:
                torch.cuda.current_stream(self.service.device).synchronize()  # KV in first
            return handle

        return await asyncio.get_running_loop().run_in_executor(None, adopt)

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

    def _audit(self) -> KVReport:
        """Every page is owned by an adopted (not yet freed) request, or free."""
        s = self.service
        live = {str(h) for h in s.ids}
        return audit_kv("executor", self.index, s.block_manager, live, live)

    async def _on_pool(self, fn):
        with self.service.lock:
            return fn()

    def _metrics(self) -> dict:
        s = self.service
        return dict(num_running=len(s.ids), num_waiting=0,
                    kv_blocks_used=s.block_manager.num_used_blocks,
                    kv_blocks_total=s.num_kv_blocks, num_steps=s.num_steps,
                    kv_bytes_read=s.kv_bytes_read, busy_s=s.busy_s,
                    busy_cpu_s=s.busy_cpu_s, serve_cpu_s=s.serve_cpu_s, napped_s=s.napped_s)


def _green_stream(device: torch.device, sm_count: int):
    """A stream whose kernels run on ``sm_count`` SMs of ``device`` (a green context)."""
    from flashinfer.green_ctx import split_device_green_ctx_by_sm_count

    streams, resources = split_device_green_ctx_by_sm_count(device, [sm_count])
    log.info("attention executor: kernels on %d SMs", resources[0].sm.smCount)
    return streams[0]
