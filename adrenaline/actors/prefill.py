"""PrefillWorker: a Ray actor that batches prompts, samples first tokens and hands off KV.

Lifecycle of a request here: prefill(req) queues it; the loop admits queued
requests into prefill steps (the engine's token budget batches them) and
answers each with its first token; the KV stays held until the router calls
send_kv (to a decode worker) or release (finished or aborted).

Prefix caching (on by default): a prompt's full blocks stay registered in
the engine's prefix cache after its KV is handed off and its blocks freed,
so a later prompt with the same prefix (the next turn of a conversation)
computes only what follows it. Each PrefillResult reports the tokens it
took from the cache and the hashes its step evicted, which is how the
router keeps its record of what this instance holds.
"""

from __future__ import annotations

import asyncio
import time

import torch

from adrenaline.actors.worker import EngineWorker
from adrenaline.engine.kv_audit import audit_kv
from adrenaline.engine.kv_transfer import kv_export_shape
from adrenaline.engine.request import Request
from adrenaline.engine.tombstones import Tombstones
from adrenaline.protocol import GenerateRequest, KVReport, PrefillResult
from adrenaline.app_config import AppArgs


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, args: AppArgs, index: int):
        super().__init__(args, args.prefill, index)
        self._queue: list[tuple[GenerateRequest, asyncio.Future]] = []
        self._waiting: dict[str, asyncio.Future] = {}
        self._released = Tombstones()  # released before they reached the engine
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._num_steps = 0
        self._step_time_s = 0.0  # time inside prefill steps (the prefill core's busy time)

    async def prefill(self, req: GenerateRequest) -> list[PrefillResult]:
        """Prefill ``req`` once; one result per choice (``params.n``), each held (when not
        finished) under its own id (``choice_request_id``; the request's own id when n = 1)
        until sent or released."""
        self._ensure_loop()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        self._wake.set()
        return await fut

    async def send_kv(self, request_id: str, dst: int, tag: int, shape: tuple[int, ...] = (),
                      dtype: str = "", epoch: int | None = None) -> None:
        """Send a held request's KV to rank ``dst`` and free it here (the copy is what travels).

        Invariant: once the router has asked for this send, a message of ``shape``/``dtype``
        always goes out, because the decode worker has posted (or will post) the matching
        receive and a gloo receive cannot be taken back. A request released meanwhile
        (cancelled) sends zeros, which the decode worker drops as aborted. With ``epoch``,
        the send goes only to that incarnation of ``dst`` (else PeerLostError).
        """
        kv = await self.engine_thread.run(self._export_and_release_or_none, request_id)
        if kv is None:
            if not shape:
                return
            kv = torch.zeros(shape, dtype=getattr(torch, dtype), device=self.engine.device)
        self._wake.set()  # freed blocks may admit waiting prompts
        await self.comm.send(kv, dst, tag, epoch)

    async def take_kv(self, request_id: str):
        """A held request's KV as a value (for the colocated executor), freed here."""
        kv = await self.engine_thread.run(self._export_and_release, request_id)
        self._wake.set()
        return kv

    async def release(self, request_id: str) -> None:
        """Free a request wherever it is here; one not yet in the engine is dropped on arrival.

        The tombstone goes first, before the engine is asked: a request that ``_run`` is
        adding to the engine meanwhile (neither queued nor known to the engine when
        ``_drop`` looks) finds it once added, and is dropped then.
        """
        self._released.add(request_id)
        if await self.engine_thread.run(self._drop, request_id):
            self._released.consume(request_id)  # it was in the engine: dropped there
        fut = self._waiting.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
        if self._wake is not None:
            self._wake.set()

    def _metrics(self) -> dict:
        e = self.engine
        return dict(num_running=len(e.held),
                    num_waiting=len(e.scheduler.waiting) + len(self._queue),
                    kv_blocks_used=e.block_manager.num_used_blocks,
                    kv_blocks_total=e.num_kv_blocks, num_steps=self._num_steps,
                    step_time_s=self._step_time_s,
                    prefill_tokens=e.scheduler.num_prefill_tokens,
                    prefix_cached_tokens=e.scheduler.num_cached_tokens,
                    kv_blocks_cached=e.block_manager.num_cached_blocks)

    def _audit(self) -> KVReport:
        """Every page is owned by a queued, prefilling or held request, or free."""
        e = self.engine
        return audit_kv("prefill", self.index, e.block_manager, set(e.requests) | set(e.held),
                        {e.kv_owner(r) for r in e.held})

    def _drop(self, request_id: str) -> bool:
        """Engine thread: abort a request the engine knows; False when it does not know it."""
        e = self.engine
        known = request_id in e.requests or request_id in e.held
        e.abort(request_id)
        return known

    def _export_and_release_or_none(self, request_id: str):
        if request_id not in self.engine.held:  # released (cancelled) already
            return None
        return self._export_and_release(request_id)

    def _export_and_release(self, request_id: str):
        kv = self.engine.export_kv(request_id)
        self.engine.release(request_id)
        return kv

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        engine = self.engine
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._steps_allowed.wait()
            queued, self._queue = self._queue, []
            for req, fut in queued:
                if self._released.consume(req.request_id):
                    fut.cancel()
                    continue
                try:
                    await self.engine_thread.run(engine.add_request, req.request_id, req.prompt_token_ids,
                                          req.params, req.output_token_ids)
                except Exception as e:  # invalid request: answer it, keep serving
                    if not fut.done():
                        fut.set_exception(e)
                    continue
                if self._released.consume(req.request_id):  # released while being added
                    await self.engine_thread.run(self._drop, req.request_id)
                    fut.cancel()
                    continue
                self._waiting[req.request_id] = fut
            if not engine.scheduler.waiting:
                continue
            start = time.perf_counter()
            done = await self.engine_thread.run(engine.prefill_step)
            self._step_time_s += time.perf_counter() - start
            self._num_steps += 1
            evicted = engine.block_manager.drain_evicted()
            for r in done:
                fut = self._waiting.pop(r.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result([self._result(c, evicted) for c in (r.choices or (r,))])
                elif r.request_id in engine.held or r.choices:  # its caller is gone
                    await self.engine_thread.run(engine.release, r.request_id)
            if engine.scheduler.waiting and done:
                self._wake.set()  # more prompts fit right away

    def _result(self, r: Request, evicted: list[int]) -> PrefillResult:
        held = r.finish_reason is None
        shape, dtype = (), ""
        if held:
            e = self.engine
            shape = kv_export_shape(e.pool, e.backend.block_dim,
                                    e.block_manager.blocks_for(r.num_computed))
            dtype = str(e.dtype).removeprefix("torch.")
        return PrefillResult(
            request_id=r.request_id, token_ids=list(r.token_ids), num_computed=r.num_computed,
            logprobs=r.logprobs, finish_reason=r.finish_reason,
            kv_shape=tuple(shape), kv_dtype=dtype, num_cached_tokens=r.num_cached_tokens,
            evicted_hashes=evicted, prompt_logprobs=r.prompt_logprobs,
            prompt_ranks=r.prompt_ranks)
