"""Blocking communicator calls from an asyncio actor, on threads of their own.

Sends and receives wait on peers, so they never run on the engine thread
(a step must not stall on the network) nor on the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from adrenaline.transport import make_communicator
from adrenaline.transport.base import Communicator


class CommThread:
    def __init__(self) -> None:
        # Several transfers may wait at once (one per peer); a pool avoids cross-peer stalls.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="comm")
        self.comm: Communicator | None = None
        self.rank = -1

    async def connect(self, kind: str, rank: int, world_size: int, init: str) -> None:
        """Join the cluster's world; returns once every rank has joined."""
        loop = asyncio.get_running_loop()
        self.comm = await loop.run_in_executor(
            self._pool, make_communicator, kind, rank, world_size, init)
        self.rank = rank

    async def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.comm.send, tensor, dst, tag)

    async def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.comm.recv, tensor, src, tag)
