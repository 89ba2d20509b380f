"""Shared-memory transport: a two-rank world of two processes on one host.

Each direction is a ring in a /dev/shm segment (transport/shm_segment.py)
with one writer and one reader. A message is a 64-byte record header (tag,
byte length) followed by its bytes, padded to 64. A message larger than the
ring streams through it in pieces, so the ring is sized for the largest
message that should pass in one go (a decode step's per-layer q/k/v at the
engine's largest batch) and KV handoffs pass in chunks.

Matching: the reader takes records in ring order. A record goes to the oldest
posted receive of its tag, or, if none is posted, into a private copy that
the next receive of that tag takes. So messages of one tag are matched in
posting order and tags are independent, as the ``Communicator`` contract asks.

Progress: there is no background thread. Whoever waits on a handle moves
both directions (writes queued sends while there is room, reads arrived
records), so two ranks that both send more than a ring holds before
receiving cannot deadlock. A waiter spins briefly (``spin_s``), then sleeps
on its rank's doorbell, a futex word the peer changes after every record it
writes and after freeing space a waiting writer asked for.

Failure: a waiter that sleeps a whole slice without news checks the peer
process (a pidfd). A dead peer, or one that closed its side, makes every
pending and later operation raise, after whatever it wrote before is read.
"""

from __future__ import annotations

import collections
import os
import select
import threading
import time

import torch

from adrenaline.transport.base import CommHandle, Communicator, DoneHandle, check_recv_buffer
from adrenaline.transport.futex import futex_wait
from adrenaline.transport.shm_segment import ALIGN, Segment, new_segment_name

DEFAULT_CAPACITY = 4 << 20  # bytes per direction
SPIN_S = 50e-6  # busy-poll this long before sleeping on the doorbell
_SLICE_S = 0.02  # longest sleep between checks of the peer process
_SPACE_SLICE_S = 0.001  # a writer waiting for space re-checks this often


def new_shm_init() -> str:
    """A fresh ``init`` for a new link (rank 0 creates the segment it names)."""
    return f"shm://{new_segment_name()}"


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


class _Op:
    """One send or receive: its bytes and how far it has got."""

    __slots__ = ("tag", "buf", "nbytes", "done", "error", "progress", "target")

    def __init__(self, tag: int, buf: torch.Tensor, target: torch.Tensor | None = None):
        self.tag = tag
        self.buf = buf  # flat uint8 (a view of the caller's tensor, or a CPU staging copy)
        self.nbytes = buf.numel()
        self.done = False
        self.error: BaseException | None = None
        self.progress = -1  # sends: body bytes written, -1 before the header
        self.target = target  # a non-CPU recv tensor that gets ``buf`` at the end


class _Incoming:
    __slots__ = ("tag", "nbytes", "dest", "op", "read")

    def __init__(self, tag: int, nbytes: int, dest: torch.Tensor, op: _Op | None):
        self.tag, self.nbytes, self.dest, self.op, self.read = tag, nbytes, dest, op, 0


class _PeerProcess:
    """Whether the peer process still runs (a pidfd where the kernel has them)."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._fd = -1

    def alive(self) -> bool:
        if self._fd >= 0:
            return not select.select([self._fd], [], [], 0)[0]
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


class _ShmHandle(CommHandle):
    def __init__(self, comm: "ShmCommunicator", op: _Op):
        self._comm: ShmCommunicator | None = comm
        self._op = op

    def wait(self) -> None:
        if self._comm is None:
            return
        comm, self._comm = self._comm, None
        comm._wait(self._op)
        if self._op.error is not None:
            raise self._op.error
        if self._op.target is not None:
            _as_bytes(self._op.target).copy_(self._op.buf)


class ShmCommunicator(Communicator):
    """One rank of a two-rank shared-memory world; see ``Communicator`` and the module notes.

    ``init`` is ``"shm://<segment name>"`` (``new_shm_init()``); rank 0 creates the
    segment with rings of ``capacity_bytes`` and the constructor returns once both
    ranks have it mapped (at most ``connect_timeout_s``). ``timeout_s`` bounds each
    operation (None: no bound; a dead peer is found either way).
    """

    def __init__(self, rank: int, world_size: int, init: str, *,
                 capacity_bytes: int = DEFAULT_CAPACITY, timeout_s: float | None = None,
                 connect_timeout_s: float = 120.0, spin_s: float = SPIN_S):
        if world_size != 2:
            raise ValueError(f"an shm world has two ranks, got world_size={world_size}")
        if not 0 <= rank < 2:
            raise ValueError(f"rank {rank} is outside a world of 2")
        if not init.startswith("shm://"):
            raise ValueError(f"shm init must be 'shm://<name>', got {init!r}")
        name = init.removeprefix("shm://")
        deadline = time.monotonic() + connect_timeout_s
        if rank == 0:
            seg = Segment.create(name, _round_up(max(capacity_bytes, ALIGN)))
            peer_pid = seg.wait_attached(name, deadline)
        else:
            seg = Segment.attach(name, deadline)
            peer_pid = seg.pid(0)
        self.rank, self.world_size = rank, 2
        self._seg = seg
        self._peer = 1 - rank
        self._peer_process = _PeerProcess(peer_pid)
        self._cap = seg.capacity
        self._out, self._in = seg.ring_bytes(rank), seg.ring_bytes(1 - rank)
        self._head = seg.head(rank)  # this side writes ring `rank` alone
        self._tail = seg.tail(1 - rank)  # and reads ring `1 - rank` alone
        self._timeout_s = timeout_s
        self._spin_s = spin_s
        self._send_lock = threading.Lock()  # the writer of the out ring
        self._recv_lock = threading.Lock()  # the reader of the in ring
        self._match_lock = threading.Lock()  # posted receives and unclaimed messages
        self._sends: collections.deque[_Op] = collections.deque()
        self._posted: dict[int, collections.deque[_Op]] = collections.defaultdict(collections.deque)
        self._unclaimed: dict[int, collections.deque[torch.Tensor]] = (
            collections.defaultdict(collections.deque))
        self._incoming: _Incoming | None = None
        self._num_waiters = 0  # threads in _wait: others are woken when their op completes
        self._waiters_lock = threading.Lock()
        self._broken: BaseException | None = None
        self._closed = False

    # ---- the Communicator API ----

    def set_spin(self, seconds: float) -> None:
        self._spin_s = seconds

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> CommHandle:
        self._check_usable(dst, tag)
        if tensor.numel() == 0:
            return DoneHandle()
        op = _Op(tag, _as_bytes(tensor.detach().to("cpu").contiguous()))
        with self._send_lock:
            self._sends.append(op)
            self._write_sends()  # as much as fits now; a waiter writes the rest
        return _ShmHandle(self, op)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> CommHandle:
        self._check_usable(src, tag)
        check_recv_buffer(tensor)
        if tensor.numel() == 0:
            return DoneHandle()
        if tensor.device.type == "cpu":
            op = _Op(tag, _as_bytes(tensor.detach()))
        else:
            op = _Op(tag, torch.empty(tensor.numel() * tensor.element_size(), dtype=torch.uint8),
                     tensor)
        with self._match_lock:
            waiting = self._unclaimed.get(tag)
            if waiting:
                self._deliver(op, waiting.popleft())
            else:
                self._posted[tag].append(op)
        return _ShmHandle(self, op)

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None:
        self.irecv(tensor, src, tag).wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seg.mark_closed()  # wakes the peer's waiters, which then raise
        self._seg.ring_bell(self.rank)  # and this process's own

    # ---- waiting and progress ----

    def _wait(self, op: _Op) -> None:
        with self._waiters_lock:
            self._num_waiters += 1
        try:
            deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
            spin_until = time.perf_counter() + self._spin_s
            bell_addr = self._seg.bell_addr(self.rank)
            while not op.done:
                self._check_usable()
                bell = self._seg.bell(self.rank)  # read before looking: no wake-up is missed
                if self._progress():
                    spin_until = time.perf_counter() + self._spin_s
                    continue
                if op.done:
                    break
                self._fail_if_peer_closed()
                if time.perf_counter() < spin_until:
                    continue
                futex_wait(bell_addr, bell, _SPACE_SLICE_S if self._sends else _SLICE_S)
                if self._seg.bell(self.rank) == bell:  # a whole slice without news
                    self._fail_if_peer_dead()
                    if deadline is not None and time.monotonic() > deadline:
                        self._broken = TimeoutError(
                            f"shm operation (tag {op.tag}) timed out after {self._timeout_s} s")
        finally:
            with self._waiters_lock:
                self._num_waiters -= 1

    def _progress(self) -> bool:
        """Write queued sends and read arrived records, where no other thread is doing it."""
        moved = False
        if self._sends and self._send_lock.acquire(blocking=False):
            try:
                moved = self._write_sends()
            finally:
                self._send_lock.release()
        if self._recv_lock.acquire(blocking=False):
            try:
                moved = self._read_records() or moved
            finally:
                self._recv_lock.release()
        return moved

    def _wake_local(self) -> None:
        """An operation another thread waits on completed: wake this process's sleepers."""
        if self._num_waiters > 1:
            self._seg.ring_bell(self.rank)

    def _write_sends(self) -> bool:
        """(send lock held) Write queued messages into the out ring while there is room."""
        seg, cap, ring = self._seg, self._cap, self.rank
        moved = completed = False
        while self._sends:
            op = self._sends[0]
            free = cap - (self._head - seg.tail(ring))
            if op.progress < 0:
                if free < ALIGN:
                    seg.want_space(ring, True)  # the reader rings when it frees space
                    break
                tag_at, len_at = seg.record_header(ring, self._head)
                seg.u32[tag_at] = op.tag
                seg.u64[len_at] = op.nbytes
                self._head += ALIGN
                free -= ALIGN
                op.progress = 0
                moved = True
            body = _round_up(op.nbytes)
            n = min(free, body - op.progress)
            if n > 0:
                self._copy_in(op.buf, op.progress, n)
                op.progress += n
                self._head += n
                moved = True
            if op.progress < body:
                seg.want_space(ring, True)  # the reader rings when it frees space
                break
            self._sends.popleft()
            op.done = completed = True
        if moved:
            seg.set_head(ring, self._head)
            seg.ring_bell(self._peer)
        if completed:
            self._wake_local()
        return moved

    def _copy_in(self, src: torch.Tensor, start: int, n: int) -> None:
        """Copy body bytes [start, start + n) of a message (padding: nothing) to the ring."""
        end = min(start + n, src.numel())
        if end > start:
            self._ring_copy(self._out, self._head, src[start:end], to_ring=True)

    def _ring_copy(self, ring: torch.Tensor, pos: int, data: torch.Tensor, to_ring: bool) -> None:
        off, n = pos % self._cap, data.numel()
        first = min(n, self._cap - off)
        for r, d in ((ring[off:off + first], data[:first]), (ring[:n - first], data[first:])):
            if d.numel():
                (r.copy_(d) if to_ring else d.copy_(r))

    def _read_records(self) -> bool:
        """(recv lock held) Read what has arrived in the in ring into its destinations."""
        seg, ring = self._seg, self._peer
        head = seg.head(ring)
        moved = completed = False
        while self._tail < head:
            if self._incoming is None:
                tag_at, len_at = seg.record_header(ring, self._tail)
                self._incoming = self._claim(seg.u32[tag_at], seg.u64[len_at])
                self._tail += ALIGN
            cur = self._incoming
            n = min(head - self._tail, _round_up(cur.nbytes) - cur.read)
            end = min(cur.read + n, cur.nbytes)
            if end > cur.read:
                self._ring_copy(self._in, self._tail, cur.dest[cur.read:end], to_ring=False)
            cur.read += n
            self._tail += n
            moved = True
            if cur.read == _round_up(cur.nbytes):
                self._incoming = None
                completed |= self._arrived(cur)
        if moved:
            seg.set_tail(ring, self._tail)
            if seg.space_wanted(ring):
                seg.want_space(ring, False)
                seg.ring_bell(self._peer)
        if completed:
            self._wake_local()
        return moved

    def _claim(self, tag: int, nbytes: int) -> _Incoming:
        """Where an arriving message goes: the oldest posted receive of its tag, or a copy."""
        with self._match_lock:
            posted = self._posted.get(tag)
            op = posted.popleft() if posted else None
        if op is not None and op.nbytes == nbytes:
            return _Incoming(tag, nbytes, op.buf, op)
        if op is not None:
            op.error = ValueError(f"recv buffer of {op.nbytes} bytes does not match the "
                                  f"{nbytes}-byte message on tag {tag}")
        return _Incoming(tag, nbytes, torch.empty(nbytes, dtype=torch.uint8), op)

    def _arrived(self, cur: _Incoming) -> bool:
        """A message is complete; returns whether a receive completed."""
        if cur.op is not None:
            cur.op.done = True
            return True
        with self._match_lock:
            posted = self._posted.get(cur.tag)
            if posted:
                self._deliver(posted.popleft(), cur.dest)
                return True
            self._unclaimed[cur.tag].append(cur.dest)
        return False

    @staticmethod
    def _deliver(op: _Op, data: torch.Tensor) -> None:
        if data.numel() != op.nbytes:
            op.error = ValueError(f"recv buffer of {op.nbytes} bytes does not match the "
                                  f"{data.numel()}-byte message on tag {op.tag}")
        else:
            op.buf.copy_(data)
        op.done = True

    # ---- failure ----

    def _check_usable(self, peer: int | None = None, tag: int = 0) -> None:
        if self._closed:
            raise RuntimeError("communicator is closed")
        if self._broken is not None:
            raise RuntimeError(f"shm link is broken: {self._broken}") from self._broken
        if peer is not None:
            self._check_peer(peer, tag)

    def _fail_if_peer_closed(self) -> None:
        """(nothing left to read) A peer that closed its side will send nothing more."""
        if self._seg.closed(self._peer) and self._seg.head(self._peer) == self._tail:
            self._broken = ConnectionResetError("the peer closed the shm link")

    def _fail_if_peer_dead(self) -> None:
        if not self._peer_process.alive() and self._seg.head(self._peer) == self._tail:
            self._broken = ConnectionResetError(
                f"the peer process {self._peer_process.pid} exited")
