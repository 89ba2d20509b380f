"""Gloo transport: torch.distributed's gloo backend over TCP.

Each communicator is a process group of its own (a TCPStore for the
rendezvous, a ``ProcessGroupGloo`` object), not torch.distributed's default
group, so one process may belong to several worlds at once: an actor keeps one
two-rank world per peer (see transport/mesh.py), and losing a peer breaks only
that world. Gloo moves bytes only,
so every tensor travels as a flat uint8 view of its storage and any dtype
(bfloat16, float8, bool, ...) round-trips bit-exactly. CUDA tensors are
staged through host memory; use NCCL for GPU-to-GPU hot paths.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import struct

import torch
import torch.distributed as dist

from adrenaline.transport.base import CommHandle, Communicator, DoneHandle, check_recv_buffer

DEFAULT_TIMEOUT_S = 300.0


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (shares its storage)."""
    return tensor.reshape(-1).view(torch.uint8)


_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_of(ip: str) -> str | None:
    """The name of the network interface that holds IPv4 address ``ip`` (None if none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:  # no IPv4 address
                continue
            if addr == ip:
                return name
    return None


class _GlooHandle(CommHandle):
    """A gloo ``Work`` plus the buffers it uses and the copy-back a staged recv needs."""

    def __init__(self, work: dist.Work, wire: torch.Tensor, target: torch.Tensor | None = None):
        self._work: dist.Work | None = work
        self._wire = wire  # kept alive until the transfer completes
        self._target = target  # a non-CPU recv tensor that receives `wire` after the transfer

    def wait(self) -> None:
        if self._work is None:
            return
        self._work.wait()
        self._work = None
        if self._target is not None:
            _as_bytes(self._target).copy_(self._wire)
            self._target = None


class GlooCommunicator(Communicator):
    """One rank of a gloo world; see ``Communicator`` for the messaging contract.

    ``init`` is ``"tcp://host:port"``; rank 0 listens on it. The constructor
    blocks until all ``world_size`` ranks have joined (so the ranks must
    construct concurrently) and raises after ``connect_timeout_s`` (default
    ``timeout_s``); ``timeout_s`` bounds each later send/recv. A timed-out operation breaks the world for every
    rank (gloo closes the pair): close and re-form it. So post a recv only
    when its message is known to be coming, not to wait for idle peers.

    ``bind_ip`` is the address peers reach this rank by: gloo binds to the interface
    holding it (GLOO_SOCKET_IFNAME, unless already set). Without it gloo resolves the
    host name, which on a multi-homed host or in a network namespace may give an
    address (e.g. loopback) that ranks on other hosts cannot reach.
    """

    def __init__(self, rank: int, world_size: int, init: str, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, bind_ip: str | None = None,
                 connect_timeout_s: float | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if not init.startswith("tcp://"):
            raise ValueError(f"gloo init must be 'tcp://host:port', got {init!r}")
        if bind_ip and "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = interface_of(bind_ip)
            if ifname is not None:  # read by gloo when the process group is made
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        host, port = init.removeprefix("tcp://").rsplit(":", 1)
        timeout = datetime.timedelta(seconds=timeout_s)
        joining = datetime.timedelta(seconds=timeout_s if connect_timeout_s is None
                                     else connect_timeout_s)
        # Rank 0 serves the store; the others connect to it (retrying until the bound).
        self._store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=joining,
                                    wait_for_workers=False)
        self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)
        self.rank = rank
        self.world_size = world_size
        self._closed = False

    @staticmethod
    def _wire_for_send(tensor: torch.Tensor) -> torch.Tensor:
        """The CPU bytes gloo sends: the tensor itself when already contiguous on CPU, else a copy."""
        return _as_bytes(tensor.detach().to("cpu").contiguous())

    @staticmethod
    def _wire_for_recv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CPU byte buffer gloo fills, and the tensor to copy it into afterwards (if staged)."""
        if tensor.device.type == "cpu":
            return _as_bytes(tensor.detach()), None
        return torch.empty(tensor.numel() * tensor.element_size(), dtype=torch.uint8), tensor

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None:
        self.irecv(tensor, src, tag).wait()

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> CommHandle:
        self._check_open()
        self._check_peer(dst, tag)
        if tensor.numel() == 0:
            return DoneHandle()
        wire = self._wire_for_send(tensor)
        return _GlooHandle(self._pg.send([wire], dst, tag), wire)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> CommHandle:
        self._check_open()
        self._check_peer(src, tag)
        check_recv_buffer(tensor)
        if tensor.numel() == 0:
            return DoneHandle()
        wire, target = self._wire_for_recv(tensor)
        return _GlooHandle(self._pg.recv([wire], src, tag), wire, target)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The group's sockets close with it: a peer blocked on this world raises.
        self._pg = None
        self._store = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("communicator is closed")
