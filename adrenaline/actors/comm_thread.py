"""Blocking communicator calls from an asyncio actor, on threads of their own.

Sends and receives wait on peers, so they never run on the engine thread
(a step must not stall on the network) nor on the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray.util
import torch

from adrenaline.transport import make_communicator
from adrenaline.transport.base import Communicator


# Executors wait on their decode workers' next step without bound, and a gloo timeout
# breaks the whole world: the world's timeout is the app's lifetime, in practice.
# Dead peers are noticed through Ray, not through transport timeouts.
WORLD_TIMEOUT_S = 365 * 24 * 3600.0


class CommThread:
    def __init__(self) -> None:
        # Sends to different peers may wait at once: a pool avoids cross-peer stalls.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="comm")
        # Receives go one at a time: measured here, torch's gloo stops delivering when
        # several receives from one peer are pending beside a receive from another
        # (which a decode worker's per-layer exchange with an executor is).
        self._recv = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comm-recv")
        self.comm: Communicator | None = None
        self.rank = -1

    async def connect(self, kind: str, rank: int, world_size: int, init: str) -> None:
        """Join the cluster's world; returns once every rank has joined.

        Gloo binds to the address Ray knows this node by, so peers on other nodes can
        reach it (gloo's own guess, from the host name, may be a loopback address).
        """
        loop = asyncio.get_running_loop()
        bind_ip = ray.util.get_node_ip_address()
        self.comm = await loop.run_in_executor(
            self._pool, lambda: make_communicator(kind, rank, world_size, init,
                                                  timeout_s=WORLD_TIMEOUT_S, bind_ip=bind_ip))
        self.rank = rank

    async def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.comm.send, tensor, dst, tag)

    async def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._recv, self.comm.recv, tensor, src, tag)
