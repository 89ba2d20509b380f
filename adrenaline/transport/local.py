"""In-process transport: the ranks of one world are threads of one process.

For roles that share a process and a device (the one-GPU layout: prefill,
attention executor and decode on one card, see engine/colocated.py), a
message is a tensor handed over in memory: ``isend`` queues a private copy
(so the sender may reuse its buffer at once) and ``irecv`` copies it into the
receiver's buffer. On CUDA the copy is ordered after the sender's work by an
event recorded on the sender's stream, so ranks may run on different streams.

Messages of one (src, dst, tag) are matched in posting order; tags are
independent. A receive blocks its caller (or its handle's ``wait()``) until
the message is there, or until the world is closed (then it raises).
"""

from __future__ import annotations

import queue
import threading

import torch

from adrenaline.transport.base import CommHandle, Communicator, DoneHandle, check_recv_buffer

_CLOSED = object()  # sentinel that wakes receivers of a closed world


class LocalWorld:
    """The shared mailboxes of ``world_size`` in-process ranks."""

    def __init__(self, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._boxes: dict[tuple[int, int, int], queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self.closed = False

    def box(self, src: int, dst: int, tag: int) -> queue.SimpleQueue:
        with self._lock:
            return self._boxes.setdefault((src, dst, tag), queue.SimpleQueue())

    def communicator(self, rank: int) -> "LocalCommunicator":
        return LocalCommunicator(self, rank)

    def close(self) -> None:
        """Wake every blocked receiver with an error; later operations raise."""
        with self._lock:
            self.closed = True
            boxes = list(self._boxes.values())
        for box in boxes:
            box.put(_CLOSED)


class _Message:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach().clone()
        self.event = None
        if self.tensor.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.tensor.device))


class _RecvHandle(CommHandle):
    def __init__(self, world: LocalWorld, box: queue.SimpleQueue, target: torch.Tensor):
        self._world = world
        self._box: queue.SimpleQueue | None = box
        self._target = target

    def wait(self) -> None:
        if self._box is None:
            return
        msg = self._box.get()
        if msg is _CLOSED:
            self._box.put(_CLOSED)  # wake the next waiter too
            raise RuntimeError("local communicator world was closed while receiving")
        self._box = None
        src = msg.tensor
        if src.numel() * src.element_size() != self._target.numel() * self._target.element_size():
            raise ValueError(f"recv buffer of {tuple(self._target.shape)} {self._target.dtype} "
                             f"does not match the message {tuple(src.shape)} {src.dtype}")
        if msg.event is not None and self._target.is_cuda:
            torch.cuda.current_stream(self._target.device).wait_event(msg.event)
        elif msg.event is not None:
            msg.event.synchronize()
        self._target.reshape(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8))


class LocalCommunicator(Communicator):
    """One rank of a ``LocalWorld``; see ``Communicator`` and the module notes."""

    def __init__(self, world: LocalWorld, rank: int):
        if not 0 <= rank < world.world_size:
            raise ValueError(f"rank {rank} is outside a world of {world.world_size}")
        self.world = world
        self.rank = rank
        self.world_size = world.world_size

    def _check(self, peer: int, tag: int) -> None:
        if self.world.closed:
            raise RuntimeError("communicator is closed")
        self._check_peer(peer, tag)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> CommHandle:
        self._check(dst, tag)
        if tensor.numel() > 0:
            self.world.box(self.rank, dst, tag).put(_Message(tensor.contiguous()))
        return DoneHandle()

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> CommHandle:
        self._check(src, tag)
        check_recv_buffer(tensor)
        if tensor.numel() == 0:
            return DoneHandle()
        return _RecvHandle(self.world, self.world.box(src, self.rank, tag), tensor)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None:
        self.irecv(tensor, src, tag).wait()

    def close(self) -> None:
        self.world.close()
