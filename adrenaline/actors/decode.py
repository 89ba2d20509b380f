"""DecodeWorker: a Ray actor running the continuous decode loop over adopted requests.

Lifecycle of a request here: adopt() receives its KV from a prefill worker
(through the communicator, never Ray's object store) and parks it until the
pool has room; adopt_offloaded() parks a request whose KV and attention live
on an attention executor (no blocks here: each decode step exchanges its
q, k, v with the executor per layer, see engine/remote_attention.py). The
loop adopts parked requests between steps, runs one decode
step for the whole batch, and records one TokenDelta per request per step.
The router collects all of a step's deltas with one poll() call.

A lost executor: the step that was talking to it fails (ExecutorsLostError,
after the surviving executors were walked to the end of that step, see
engine/remote_attention.py); the loop waits until the replacement is linked,
whose ``link`` first drops the requests that lived on the lost one (the
router reruns them), then retries the step for everyone else. Nothing a
client sees changes: tokens are appended only when a step completes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from adrenaline.actors.worker import EngineWorker
from adrenaline.engine.kv_audit import audit_kv
from adrenaline.engine.remote_attention import (EXCHANGE_SPIN_S, ExecutorsLostError,
                                                RemoteAttention, exchange_message_bytes)
from adrenaline.engine.request import Request
from adrenaline.engine.tombstones import Tombstones
from adrenaline.engine.kv_pool import kv_bytes_per_token
from adrenaline.engine.step_profile import profile_decode, profile_exchange
from adrenaline.protocol import GenerateRequest, KVReport, PrefillResult, TokenDelta
from adrenaline.app_config import AppArgs

log = logging.getLogger(__name__)


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, args: AppArgs, index: int):
        super().__init__(args, args.decode, index)
        # KV received (None: offloaded, KV on an executor), waiting to join the batch.
        self._parked: list[tuple[Request, torch.Tensor | None]] = []
        self._outbox: list[TokenDelta] = []
        self._reported: dict[str, int] = {}  # request id -> output tokens already reported
        self._aborted = Tombstones()  # aborted before they arrived
        # Guards _parked/_aborted between the event loop (_park) and the engine thread
        # (_adopt_parked, abort): a request is parked, in the engine, or aborted, never lost.
        self._park_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._has_output: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._num_steps = 0
        self._step_time_s = 0.0  # time inside engine steps, for metrics
        self._step_cpu_s = 0.0  # the engine thread's CPU time in them
        self._batch_sum = 0  # sum of step batch sizes (mean batch = sum / steps)
        self._local_kv_sum = 0  # sum of the KV tokens each step's local attention read
        self._executor_ranks: list[int] = []
        self._relinked: asyncio.Event | None = None  # set when an executor link is made

    async def set_rank(self, rank: int, world_size: int, executor_ranks: list[int] = ()) -> None:
        await super().set_rank(rank, world_size)
        self._executor_ranks = list(executor_ranks)
        if executor_ranks:
            e = self.engine
            mc = e.model_config
            e.runner.remote = RemoteAttention(
                self.comm.mesh, list(executor_ranks), mc.num_attention_heads,
                mc.num_key_value_heads, mc.head_dim, num_layers=mc.num_hidden_layers,
                dtype=e.dtype, device=e.device)

    async def link(self, kind: str, peer: int, init: str, host: bool, epoch: int) -> None:
        """Reach ``peer`` (a prefill worker or an executor, in its ``epoch``). An executor's
        link replaces its old one between two steps, after dropping the requests whose KV
        lived on the old one (their attempts rerun)."""
        self._ensure_loop()
        await super().link(kind, peer, init, host, epoch)

    def _ring_bytes(self, peer: int) -> int:
        if peer not in self._executor_ranks:
            return super()._ring_bytes(peer)
        e = self.engine  # one decode step's per-layer exchange at the largest batch
        return 2 * exchange_message_bytes(e.model_config, e.dtype, e.config.max_num_seqs)

    async def _linked(self, peer: int, pair, peer_rank: int, epoch: int) -> None:
        if peer not in self._executor_ranks:
            await super()._linked(peer, pair, peer_rank, epoch)
            return
        pair.set_spin(EXCHANGE_SPIN_S)
        await self.engine_thread.run(self._install_executor_link, peer, pair, peer_rank, epoch)
        self._relinked.set()

    def _install_executor_link(self, peer: int, pair, peer_rank: int, epoch: int) -> None:
        """Engine thread (between steps): forget the old executor's requests, link the new."""
        executor = self._executor_ranks.index(peer)
        engine = self.engine
        with self._park_lock:
            gone = [p for p in self._parked if p[0].executor == executor]
            for p in gone:
                self._parked.remove(p)
            gone_ids = [p[0].request_id for p in gone]
            for r in list(engine.requests.values()):
                if r.executor == executor:
                    engine.abort(r.request_id)
                    gone_ids.append(r.request_id)
            for rid in gone_ids:
                self._reported.pop(rid, None)
            self.comm.mesh.link(peer, pair, peer_rank, epoch)
        if gone_ids:
            log.warning("executor %d replaced: dropped %d requests that lived on it",
                        executor, len(gone_ids))

    async def adopt(self, req: GenerateRequest, pre: PrefillResult, src: int, tag: int,
                    epoch: int | None = None) -> None:
        """Receive a prefilled request's KV from rank ``src`` (in its ``epoch``: never from
        its replacement) and queue it for decoding."""
        self._ensure_loop()
        kv = torch.empty(pre.kv_shape, dtype=getattr(torch, pre.kv_dtype),
                         device=self.engine.device)
        await self.comm.recv(kv, src, tag, epoch)
        self._park(req, pre, kv)

    async def adopt_offloaded(self, req: GenerateRequest, pre: PrefillResult, executor: int,
                              handle: int, epoch: int | None = None) -> None:
        """Queue a request whose KV lives on attention executor ``executor`` as ``handle``.

        With ``epoch``, only while that executor is still the one of that epoch (a request
        adopted by a lost executor is dropped: its attempt reruns)."""
        self._ensure_loop()
        self._park(req, pre, None, executor, handle, epoch)

    def _park(self, req: GenerateRequest, pre: PrefillResult, kv: torch.Tensor | None,
              executor: int | None = None, handle: int = -1, epoch: int | None = None) -> None:
        with self._park_lock:
            if self._aborted.consume(req.request_id):  # cancelled while its KV was in flight
                return
            if epoch is not None and \
                    self.comm.mesh.epoch(self._executor_ranks[executor]) != epoch:
                return  # its executor was lost meanwhile
            self._park_locked(req, pre, kv, executor, handle)
        self._wake.set()

    def _park_locked(self, req: GenerateRequest, pre: PrefillResult, kv: torch.Tensor | None,
                     executor: int | None, handle: int) -> None:
        r = Request(req.request_id, req.prompt_token_ids, req.params, arrival=0,
                    eos_token_ids=self.engine.model_config.eos_token_ids,
                    max_model_len=self.engine.max_model_len)
        r.token_ids = list(pre.token_ids)
        r.num_computed = pre.num_computed
        if pre.logprobs is not None:
            r.logprobs = list(pre.logprobs)
        r.executor, r.remote_handle = executor, handle
        self._reported[r.request_id] = r.num_output_tokens  # the prefill token was already sent
        self._parked.append((r, kv))

    async def profile_steps(self, batch_sizes: list[int]) -> tuple[dict[int, float], float]:
        """Start-up only: (base step seconds by batch, attention seconds per KV token),
        timed on synthetic requests (engine/step_profile.py); the pool is left empty."""
        return await self.engine_thread.run(profile_decode, self.engine, batch_sizes)

    async def profile_exchange(self, executor: int, handle: int, context: int) -> float:
        """Start-up only: seconds a step waits on ``executor`` for one offloaded request."""
        return await self.engine_thread.run(profile_exchange, self.engine, executor, handle,
                                            context)

    async def kv_bytes_per_token(self) -> int:
        e = self.engine
        return kv_bytes_per_token(e.model_config, e.dtype)

    async def poll(self) -> list[TokenDelta]:
        """All deltas since the previous poll (waits until there is at least one)."""
        self._ensure_loop()
        while not self._outbox:
            self._has_output.clear()
            await self._has_output.wait()
        out, self._outbox = self._outbox, []
        return out

    async def abort(self, request_id: str) -> None:
        """Free a request wherever it is here; returns once its pages are free.

        Runs on the engine thread, between two steps: _adopt_parked moves parked
        requests into the engine on that thread, so a request is always found either
        parked or in the engine (or not arrived yet: then it is dropped on arrival).
        """
        self._ensure_loop()
        await self.engine_thread.run(self._abort_here, request_id)
        self._reported.pop(request_id, None)

    def _abort_here(self, request_id: str) -> None:
        with self._park_lock:  # against _park on the event loop
            parked = [p for p in self._parked if p[0].request_id == request_id]
            if parked:
                self._parked.remove(parked[0])
            elif request_id not in self.engine.requests:
                self._aborted.add(request_id)  # not here yet: drop it on arrival
        self.engine.abort(request_id)

    def _audit(self) -> KVReport:
        """Every page is owned by a running local request, or free. Offloaded requests
        own no pages here; preempted (waiting) ones own none until prefilled again."""
        e = self.engine
        local = {r.request_id for r in e.scheduler.running if not r.is_offloaded}
        return audit_kv("decode", self.index, e.block_manager, local, local)

    def _metrics(self) -> dict:
        e = self.engine
        remote = e.runner.remote
        waiting_on, waiting_s = remote.waiting() if remote else (-1, 0.0)
        return dict(num_running=len(e.scheduler.running),
                    waiting_on_executor=waiting_on, waiting_s=waiting_s,
                    num_offloaded=sum(r.is_offloaded for r in e.scheduler.running),
                    remote_wait_s=remote.round_trip_s if remote else 0.0,
                    num_remote_waits=remote.num_round_trips if remote else 0,
                    step_time_s=self._step_time_s, step_cpu_s=self._step_cpu_s,
                    batch_size_sum=self._batch_sum, local_kv_tokens_sum=self._local_kv_sum,
                    num_waiting=len(e.scheduler.waiting) + len(self._parked),
                    kv_blocks_used=e.block_manager.num_used_blocks,
                    kv_blocks_total=e.num_kv_blocks, num_steps=self._num_steps,
                    num_preemptions=e.scheduler.num_preemptions)

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._has_output = asyncio.Event()
            self._relinked = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _adopt_parked(self) -> None:
        """Engine thread: take in parked requests, oldest first, while blocks last."""
        engine = self.engine
        while True:
            with self._park_lock:
                if not (self._parked and (self._parked[0][0].is_offloaded
                                          or engine.can_adopt(self._parked[0][0].num_tokens))):
                    return
                req, kv = self._parked.pop(0)
            engine.adopt(req, kv)  # abort runs on this thread too: never in between

    async def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_unfinished and not self._parked:
                self._wake.clear()
                await self._wake.wait()
            await self._steps_allowed.wait()
            await self.engine_thread.run(self._adopt_parked)
            if not engine.has_unfinished:
                await asyncio.sleep(0.001)  # parked requests wait for blocks held elsewhere
                continue
            start = time.perf_counter()
            mesh = self.comm.mesh
            before = {e: mesh.epoch(r) for e, r in enumerate(self._executor_ranks)}
            try:
                stepped, cpu_s = await self.engine_thread.run(_timed_step, engine)
            except ExecutorsLostError as e:
                await self._await_replacements(e.executors, before)
                continue
            self._step_time_s += time.perf_counter() - start
            self._step_cpu_s += cpu_s
            self._batch_sum += len(stepped)
            self._local_kv_sum += sum(r.num_tokens for r in stepped if not r.is_offloaded)
            self._num_steps += 1
            for r in stepped:
                self._emit(r)
            if self._outbox:
                self._has_output.set()
            await asyncio.sleep(0)  # let adopt/abort/poll calls in between steps

    async def _await_replacements(self, executors: set[int], before: dict[int, int]) -> None:
        """After a step failed on lost executors: wait until each is linked anew."""
        log.warning("decode step failed: executors %s lost; waiting for replacements",
                    sorted(executors))
        mesh = self.comm.mesh
        ranks = {e: self._executor_ranks[e] for e in executors}
        for e, rank in ranks.items():
            if before.get(e) is not None:  # fail fast until its replacement links
                mesh.drop(rank, before[e])
        while True:
            self._relinked.clear()  # before the check: a link made after it sets it again
            if all(mesh.epoch(r) not in (None, before.get(e)) for e, r in ranks.items()):
                return
            await self._relinked.wait()

    def _emit(self, r: Request) -> None:
        sent = self._reported.get(r.request_id)
        if sent is None:
            return  # aborted
        new = r.output_token_ids[sent:]
        if not new and r.finish_reason is None:
            return
        self._outbox.append(TokenDelta(
            request_id=r.request_id, token_ids=new,
            logprobs=r.logprobs[sent:] if r.logprobs is not None else None,
            finish_reason=r.finish_reason))
        self._reported[r.request_id] = r.num_output_tokens
        if r.finish_reason is not None:
            del self._reported[r.request_id]


def _timed_step(engine):
    """Engine thread: one step, and the CPU time this thread spent in it."""
    start = time.thread_time()
    stepped = engine.step()
    return stepped, time.thread_time() - start
