"""Worker: what the three actor roles (prefill, decode, attention executor) share.

Each is an asyncio Ray actor with a global rank and a link (a two-rank world,
actors/comm_thread.py) to each peer it exchanges tensors with; the router keeps one
``watch`` call pending on each to learn of its death, reads its ``pid`` (failure tests),
its ``metrics`` and its KV audit (``check_kv``). A role says what is its own: ``role``,
the audit (``_audit``, run where the pool is touched: ``_on_pool``), its metrics' fields
(``_metrics``) and what a new link serves (``_linked``). ``EngineWorker`` is a worker
running an EngineCore on its engine thread (prefill and decode).
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable, TypeVar

from adrenaline.actors.comm_thread import KV_RING_BYTES, CommThread
from adrenaline.actors.engine_thread import EngineThread
from adrenaline.actors.pinning import pin_process
from adrenaline.app_config import AppArgs, RoleConfig
from adrenaline.protocol import KVReport, WorkerInfo, WorkerMetrics
from adrenaline.transport.base import Communicator

T = TypeVar("T")


class Worker:
    role = ""  # "prefill" | "decode" | "executor"

    def __init__(self, index: int):
        self.index = index
        self.comm = CommThread()

    async def set_rank(self, rank: int, world_size: int) -> None:
        self.comm.start(rank, world_size)

    async def rendezvous_address(self, kind: str = "gloo") -> str:
        return self.comm.rendezvous_address(kind)

    async def node_id(self) -> str:
        return self.comm.node_id()

    async def link(self, kind: str, peer: int, init: str, host: bool, epoch: int) -> None:
        """Reach rank ``peer`` (in its ``epoch``) through a new two-rank world; ``host``:
        this side serves the rendezvous at ``init``."""
        pair = await self.comm.join(kind, init, host, self._ring_bytes(peer))
        await self._linked(peer, pair, 1 if host else 0, epoch)

    def _ring_bytes(self, peer: int) -> int:
        """An shm link's ring size: the largest message to ``peer`` that passes in one
        piece (by default a KV handoff's piece, actors/comm_thread.py)."""
        return KV_RING_BYTES

    async def _linked(self, peer: int, pair: Communicator, peer_rank: int, epoch: int) -> None:
        """The link's world is made: record it under the peer's epoch."""
        self.comm.mesh.link(peer, pair, peer_rank, epoch)

    async def pid(self) -> int:
        return os.getpid()

    async def watch(self) -> None:
        """Never returns: the router keeps one call pending so Ray tells it when this dies."""
        await asyncio.Event().wait()

    async def check_kv(self) -> KVReport:
        """Audit: every page of this actor's pool is owned by a request it holds, or free."""
        return await self._on_pool(self._audit)

    async def metrics(self) -> WorkerMetrics:
        return WorkerMetrics(role=self.role, index=self.index, **self._metrics())

    # -- each role's own
    def _audit(self) -> KVReport:
        raise NotImplementedError

    def _metrics(self) -> dict:
        raise NotImplementedError

    async def _on_pool(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` where this role's KV pool may be read."""
        raise NotImplementedError


class EngineWorker(Worker):
    """A worker whose KV pool is an EngineCore's, changed on its engine thread only; it
    runs on its role's cores (``cpus``, actors/pinning.py)."""

    def __init__(self, args: AppArgs, role: RoleConfig, index: int):
        super().__init__(index)
        pin_process(role.cpus, f"{self.role}.cpus", role.nice)
        self.engine_thread = EngineThread(args, role.engine, role.cpus)
        self.engine = self.engine_thread.core
        self._steps_allowed = asyncio.Event()  # the worker's loop waits on it between steps
        self._steps_allowed.set()

    async def info(self) -> WorkerInfo:
        return self.engine_thread.info()

    async def hold_steps(self, held: bool) -> None:
        """While held, the worker's loop starts no step: prompts stay queued on a prefill
        worker, handed-off requests parked on a decode worker, running ones unfinished.
        A test hook that makes an event certain instead of timed: a batch that outgrows
        the pool, a kill that finds requests at a given stage."""
        if held:
            self._steps_allowed.clear()
        else:
            self._steps_allowed.set()

    async def _on_pool(self, fn: Callable[[], T]) -> T:
        return await self.engine_thread.run(fn)
