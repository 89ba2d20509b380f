"""Choosing and rendezvousing a transport backend by name."""

from __future__ import annotations

import socket

from adrenaline.transport.base import Communicator

KINDS = ("gloo", "nccl", "shm")


def find_free_port() -> int:
    """A TCP port that was free on every interface when asked.

    Another process can take it before the caller binds it (the usual race);
    a failed rendezvous should retry with a fresh port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_communicator(kind: str, rank: int, world_size: int, init: str,
                      *, timeout_s: float | None = None,
                      bind_ip: str | None = None,
                      connect_timeout_s: float | None = None,
                      capacity_bytes: int | None = None) -> Communicator:
    """Join a world of ``world_size`` ranks as ``rank``; blocks until every rank has joined.

    ``init`` is ``"tcp://host:port"`` (rank 0 listens there) for ``"gloo"`` and
    the hex string of ``new_nccl_unique_id()`` (made by one rank, shared with
    all) for ``"nccl"``. ``timeout_s`` bounds gloo's rendezvous and each of its
    operations; ``connect_timeout_s``, when given, bounds gloo's rendezvous alone (a world
    that must wait long for messages but give up soon on a peer that never joins). NCCL has
    no timeout. ``"shm"`` is a two-rank world of two processes on one host: ``init`` is
    ``"shm://<name>"`` from ``new_shm_init()``, and rank 0 makes rings of ``capacity_bytes``
    per direction. ``bind_ip``: gloo's own address (this host's
    address its peers reach it by); None lets gloo guess from the host name.
    """
    if kind == "gloo":
        from adrenaline.transport.gloo import DEFAULT_TIMEOUT_S, GlooCommunicator
        return GlooCommunicator(rank, world_size, init, bind_ip=bind_ip,
                                timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
                                connect_timeout_s=connect_timeout_s)
    if kind == "nccl":
        from adrenaline.transport.nccl import NcclCommunicator
        return NcclCommunicator(world_size, init, rank)
    if kind == "shm":
        from adrenaline.transport.shm import DEFAULT_CAPACITY, ShmCommunicator
        return ShmCommunicator(rank, world_size, init,
                               capacity_bytes=capacity_bytes or DEFAULT_CAPACITY,
                               timeout_s=timeout_s,
                               connect_timeout_s=120.0 if connect_timeout_s is None
                               else connect_timeout_s)
    raise ValueError(f"unknown communicator kind {kind!r}; expected one of {', '.join(KINDS)}")
