"""Blocking communicator calls from an asyncio actor, on threads of their own.

Sends and receives wait on peers, so they never run on the engine thread
(a step must not stall on the network) nor on the event loop.

An actor reaches each peer through a two-rank world of its own (a
``PeerMesh`` link, transport/mesh.py), made by ``link``: a lost peer breaks
only its link, and its replacement is linked in without the other actors
taking part.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import ray.util
import torch

from adrenaline.transport import find_free_port, make_communicator
from adrenaline.transport.base import Communicator
from adrenaline.transport.mesh import PeerMesh
from adrenaline.transport.shm import new_shm_init


# Executors wait on their decode workers' next step without bound, and a gloo timeout
# breaks the whole world: the world's timeout is the app's lifetime, in practice.
# Dead peers are noticed through Ray, not through transport timeouts.
WORLD_TIMEOUT_S = 365 * 24 * 3600.0
# A peer that does not join a link's rendezvous within this is treated as gone.
LINK_TIMEOUT_S = 120.0
# An shm link between a prefill and a decode worker carries KV handoffs, which stream
# through its rings in pieces of at most this many bytes.
KV_RING_BYTES = 8 << 20


class CommThread:
    def __init__(self) -> None:
        # Sends to different peers may wait at once: a pool avoids cross-peer stalls.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="comm")
        # Receives go one at a time: measured here, torch's gloo stops delivering when
        # several receives from one peer are pending beside a receive from another
        # (which a decode worker's per-layer exchange with an executor is).
        self._recv = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comm-recv")
        # A link's rendezvous waits for its peer: one thread each, never queued behind
        # another link's (two actors linking to each other's peers must not deadlock).
        self._links = ThreadPoolExecutor(max_workers=64, thread_name_prefix="comm-link")
        self.mesh: PeerMesh | None = None  # this actor's links, by peer rank
        self.rank = -1

    def start(self, rank: int, world_size: int) -> None:
        """Take global ``rank`` in a cluster of ``world_size`` actors (before any link)."""
        self.mesh = PeerMesh(rank, world_size)
        self.rank = rank

    @staticmethod
    def rendezvous_address(kind: str = "gloo") -> str:
        """Where a link of ``kind`` with this actor serving the rendezvous meets: for gloo this
        node and a free port; for shm a new segment name (made by this side on this host)."""
        if kind == "shm":
            return new_shm_init()
        return f"tcp://{ray.util.get_node_ip_address()}:{find_free_port()}"

    @staticmethod
    def node_id() -> str:
        """The Ray node this actor runs on (links between actors of one node use shm)."""
        return ray.get_runtime_context().get_node_id()

    async def join(self, kind: str, init: str, host: bool,
                   ring_bytes: int | None = None) -> Communicator:
        """Make the two-rank world of one link; returns once the peer has joined too.

        ``host``: this side serves the rendezvous at ``init`` (rank 0 of the pair); for shm
        it makes the segment, with rings of ``ring_bytes`` (the largest message that
        should pass in one piece). Gloo binds to the address Ray knows this node by, so
        peers on other nodes can reach it (gloo's own guess, from the host name, may be a
        loopback address).
        """
        bind_ip = ray.util.get_node_ip_address()
        return await asyncio.get_running_loop().run_in_executor(
            self._links, lambda: make_communicator(kind, 0 if host else 1, 2, init,
                                                   timeout_s=WORLD_TIMEOUT_S, bind_ip=bind_ip,
                                                   connect_timeout_s=LINK_TIMEOUT_S,
                                                   capacity_bytes=ring_bytes))

    async def send(self, tensor: torch.Tensor, dst: int, tag: int,
                   epoch: int | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: self.mesh.send(tensor, dst, tag, epoch))

    async def recv(self, tensor: torch.Tensor, src: int, tag: int,
                   epoch: int | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._recv, lambda: self.mesh.recv(tensor, src, tag, epoch))
