"""The shared-memory segment of one shm link: its file, its layout and its clean-up.

One segment per link (a two-rank world of two processes on one host), a file
in /dev/shm named ``adrenaline-shm-<creator pid>-<random>``:

    control page (4 KiB): magic, ring capacity, both pids, both closed flags,
                          one doorbell (futex word) per rank,
                          per ring: head (bytes written) and tail (bytes read)
    ring 0: rank 0 -> rank 1, ``capacity`` bytes
    ring 1: rank 1 -> rank 0, ``capacity`` bytes

Invariants: the file exists only between its creation by rank 0 and rank 1's
attach. Rank 0 unlinks it as soon as rank 1 has mapped it, so the memory goes
back to the system when the last of the two processes unmaps it, however they
end (close, crash, kill -9). A file whose creator is dead (killed before its
peer attached) is removed by the next segment created on the host
(``remove_stale_segments``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import secrets
import time

import torch

from adrenaline.transport.futex import futex_wait, futex_wake

SHM_DIR = "/dev/shm"
PREFIX = "adrenaline-shm-"
_NAME = re.compile(r"^adrenaline-shm-(\d+)-[0-9a-f]{16}$")
_MAGIC = 0x31304D4853524441  # "ADRSHM01"
CONTROL_BYTES = 4096
ALIGN = 64  # ring records start on 64-byte boundaries (a cache line)

# Byte offsets in the control page.
_MAGIC_AT, _CAPACITY_AT, _PID_AT = 0, 8, 16          # pid of rank r at 16 + 8r
_CLOSED_AT = 32                                       # u32 per rank at 32 + 4r
_BELL_AT = 128                                        # u32 per rank at 128 + 64r
_HEAD_AT, _TAIL_AT = 256, 320                         # u64 per ring at +128d
_SPACE_WANTED_AT = 512                                # u32 per ring at +4d


def new_segment_name() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def check_segment_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"not an shm link name: {name!r} (expected {PREFIX}<pid>-<16 hex>)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_segments(directory: str = SHM_DIR) -> list[str]:
    """Remove link segments whose creator process is gone; returns the names removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


class Segment:
    """A mapped link segment; ``rank`` is this process's side."""

    def __init__(self, mm: mmap.mmap, capacity: int, rank: int):
        self.mm = mm
        self.capacity = capacity
        self.rank = rank
        self.u64 = memoryview(mm).cast("Q")
        self.u32 = memoryview(mm).cast("I")
        self.bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(mm))

    # ---- creation and attach ----

    @classmethod
    def create(cls, name: str, capacity: int) -> "Segment":
        """Rank 0: make the file and its layout; the peer attaches with ``attach``."""
        check_segment_name(name)
        if capacity < ALIGN or capacity % ALIGN:
            raise ValueError(f"ring capacity must be a positive multiple of {ALIGN}, got {capacity}")
        remove_stale_segments()
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, CONTROL_BYTES + 2 * capacity)
            mm = mmap.mmap(fd, CONTROL_BYTES + 2 * capacity)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        seg = cls(mm, capacity, 0)
        seg.u64[_CAPACITY_AT // 8] = capacity
        seg.u64[_PID_AT // 8] = os.getpid()
        seg.u64[_MAGIC_AT // 8] = _MAGIC  # last: the peer reads the layout only after it
        return seg

    @classmethod
    def attach(cls, name: str, deadline: float) -> "Segment":
        """Rank 1: map the file rank 0 made (waiting for it until ``deadline``)."""
        check_segment_name(name)
        path = os.path.join(SHM_DIR, name)
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    size = os.fstat(fd).st_size
                    if size > CONTROL_BYTES:
                        mm = mmap.mmap(fd, size)
                        head = memoryview(mm).cast("Q")
                        ready = head[_MAGIC_AT // 8] == _MAGIC
                        capacity = head[_CAPACITY_AT // 8]
                        head.release()
                        if ready and size == CONTROL_BYTES + 2 * capacity:
                            seg = cls(mm, capacity, 1)
                            seg.u64[(_PID_AT + 8) // 8] = os.getpid()
                            seg.ring_bell(0)
                            return seg
                        mm.close()
                finally:
                    os.close(fd)
            if time.monotonic() > deadline:
                raise TimeoutError(f"shm link {name}: the creating side did not appear in time")
            time.sleep(0.005)

    def wait_attached(self, name: str, deadline: float) -> int:
        """Rank 0: wait for the peer's attach, then unlink the file; returns the peer's pid."""
        try:
            while True:
                bell = self.bell(0)
                pid = self.pid(1)
                if pid:
                    return pid
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shm link {name}: the peer did not attach in time")
                futex_wait(self.bell_addr(0), bell, 0.05)
        finally:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass

    # ---- control fields ----

    def pid(self, rank: int) -> int:
        return self.u64[(_PID_AT + 8 * rank) // 8]

    def closed(self, rank: int) -> bool:
        return bool(self.u32[(_CLOSED_AT + 4 * rank) // 4])

    def mark_closed(self) -> None:
        self.u32[(_CLOSED_AT + 4 * self.rank) // 4] = 1
        self.ring_bell(1 - self.rank)

    def bell(self, rank: int) -> int:
        return self.u32[(_BELL_AT + 64 * rank) // 4]

    def bell_addr(self, rank: int) -> int:
        return self._base + _BELL_AT + 64 * rank

    def ring_bell(self, rank: int) -> None:
        """Change ``rank``'s doorbell and wake its sleepers (after the state it signals)."""
        i = (_BELL_AT + 64 * rank) // 4
        self.u32[i] = (self.u32[i] + 1) & 0xFFFFFFFF
        futex_wake(self.bell_addr(rank))

    def head(self, ring: int) -> int:
        return self.u64[(_HEAD_AT + 128 * ring) // 8]

    def set_head(self, ring: int, value: int) -> None:
        self.u64[(_HEAD_AT + 128 * ring) // 8] = value

    def tail(self, ring: int) -> int:
        return self.u64[(_TAIL_AT + 128 * ring) // 8]

    def set_tail(self, ring: int, value: int) -> None:
        self.u64[(_TAIL_AT + 128 * ring) // 8] = value

    def want_space(self, ring: int, wanted: bool) -> None:
        """The writer of ``ring`` is (or no longer is) waiting for its reader to free space."""
        self.u32[(_SPACE_WANTED_AT + 4 * ring) // 4] = int(wanted)

    def space_wanted(self, ring: int) -> bool:
        return bool(self.u32[(_SPACE_WANTED_AT + 4 * ring) // 4])

    def record_header(self, ring: int, pos: int) -> tuple[int, int]:
        """Indexes of the record header at ring position ``pos``: its tag in ``u32``, its length in ``u64``."""
        at = CONTROL_BYTES + ring * self.capacity + pos % self.capacity
        return at // 4, at // 8 + 1

    def ring_bytes(self, ring: int) -> torch.Tensor:
        start = CONTROL_BYTES + ring * self.capacity
        return self.bytes[start:start + self.capacity]
