"""The shared-memory transport's own guarantees, between real processes (no Ray).

The contract tests it shares with gloo (ordering, tags, sizes, zero size) are in
tests/integration/test_transport.py; here: streaming both ways at once, close, a
peer killed mid-message, a size mismatch, and segments left by killed processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from adrenaline.transport.mesh import PeerLostError, PeerMesh
from adrenaline.transport.shm import ShmCommunicator, new_shm_init
from adrenaline.transport.shm_segment import PREFIX, SHM_DIR, remove_stale_segments

RING = 4096  # small rings: every message below streams through in many pieces


def _segments() -> set[str]:
    return {f for f in os.listdir(SHM_DIR) if f.startswith(PREFIX)}


def _pair_in_threads(ring: int = RING) -> tuple[ShmCommunicator, ShmCommunicator]:
    """Both ranks in this process (threads): enough for the single-process properties."""
    init, out = new_shm_init(), {}
    t = threading.Thread(target=lambda: out.setdefault(1, ShmCommunicator(1, 2, init)))
    t.start()
    a = ShmCommunicator(0, 2, init, capacity_bytes=ring)
    t.join(timeout=30)
    return a, out[1]


def _echo_large(init: str, numel: int) -> None:
    """Rank 1 in a child process: send a large message and receive one, both posted at once."""
    c = ShmCommunicator(1, 2, init, timeout_s=60)
    mine = torch.arange(numel, dtype=torch.int32) * 3
    theirs = torch.empty(numel, dtype=torch.int32)
    s, r = c.isend(mine, 0, 1), c.irecv(theirs, 0, 2)
    s.wait()
    r.wait()
    c.send(theirs, 0, 3)  # echo back what arrived, for the parent to check
    c.close()


def test_both_sides_stream_more_than_a_ring_at_once():
    """Each rank sends ~100 rings' worth before receiving: waiting on one direction
    moves the other, so neither blocks the other."""
    ctx = mp.get_context("spawn")
    init, numel = new_shm_init(), 100 * RING // 4 + 13
    child = ctx.Process(target=_echo_large, args=(init, numel))
    child.start()
    c = ShmCommunicator(0, 2, init, capacity_bytes=RING, timeout_s=60)
    mine = torch.arange(numel, dtype=torch.int32) * 5
    theirs, echoed = torch.empty(numel, dtype=torch.int32), torch.empty(numel, dtype=torch.int32)
    s, r = c.isend(mine, 1, 2), c.irecv(theirs, 1, 1)
    s.wait()
    r.wait()
    c.recv(echoed, 1, 3)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert torch.equal(theirs, torch.arange(numel, dtype=torch.int32) * 3)
    assert torch.equal(echoed, mine)
    c.close()
    assert not _segments() & {init.removeprefix("shm://")}


def test_size_mismatch_is_an_error_not_a_partial_fill():
    a, b = _pair_in_threads()
    a.send(torch.ones(10), 1, 4)
    with pytest.raises(ValueError, match="does not match"):
        b.recv(torch.empty(9), 0, 4)
    a.send(torch.full((3,), 7.0), 1, 4)  # the link goes on: the next message is intact
    got = torch.empty(3)
    b.recv(got, 0, 4)
    assert torch.equal(got, torch.full((3,), 7.0))
    a.close()
    b.close()


def test_close_wakes_a_blocked_peer_and_later_calls_raise():
    a, b = _pair_in_threads()
    err: list[BaseException] = []

    def blocked() -> None:
        try:
            b.recv(torch.empty(4), 0, 9)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            err.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # nothing was sent: it waits
    a.close()
    t.join(timeout=5)
    assert not t.is_alive() and err and "closed" in str(err[0])
    with pytest.raises(RuntimeError, match="closed"):
        a.send(torch.ones(1), 1)
    a.close()  # idempotent
    b.close()


_KILLED_SENDER = """
import sys, torch
from adrenaline.transport.shm import ShmCommunicator
c = ShmCommunicator(1, 2, sys.argv[1])
print("joined", flush=True)
# Far more than the ring holds, and nobody receives: this blocks mid-message until killed.
c.send(torch.ones(1 << 22, dtype=torch.uint8), 0, 1)
"""


def test_peer_killed_mid_message_raises_peer_lost_and_leaves_no_segment():
    init = new_shm_init()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SENDER, init],
                             stdout=subprocess.PIPE, text=True)
    try:
        comm = ShmCommunicator(0, 2, init, capacity_bytes=RING)
        assert child.stdout.readline().strip() == "joined"
        mesh = PeerMesh(0, 2)
        mesh.link(1, comm, 1)
        buf = torch.empty(1 << 22, dtype=torch.uint8)
        handle = mesh.irecv(buf, 1, 2)  # another tag: the 4 MiB message streams into a copy
        # Kill only once the child has written part of its message into the ring (forced:
        # the ring holds 4 KiB of the 4 MiB, so it is then blocked mid-message).
        deadline = time.monotonic() + 60
        while comm._seg.head(1) == 0:
            assert time.monotonic() < deadline, "the child never started its message"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(PeerLostError):
            handle.wait()
        assert time.monotonic() - start < 2.0  # found within a few of the transport's checks
    finally:
        child.kill()
        child.wait()
    assert init.removeprefix("shm://") not in _segments()


def test_segment_left_by_a_killed_process_is_removed_at_start():
    # A process that made a segment and was killed before its peer attached.
    code = ("import os; from adrenaline.transport.shm_segment import Segment, new_segment_name; "
            "name = new_segment_name(); Segment.create(name, 4096); print(name, flush=True); "
            "os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    name = out.stdout.strip()
    assert name in _segments(), "the killed process should have left its segment"
    a, b = _pair_in_threads()  # making any new segment removes the host's stale ones
    assert name not in _segments()
    a.close()
    b.close()


def test_remove_stale_keeps_live_creators_segments(tmp_path):
    live = tmp_path / f"{PREFIX}{os.getpid()}-{'a' * 16}"
    dead = tmp_path / f"{PREFIX}999999999-{'b' * 16}"
    other = tmp_path / "not-ours"
    for p in (live, dead, other):
        p.write_bytes(b"x")
    assert remove_stale_segments(str(tmp_path)) == [dead.name]
    assert live.exists() and other.exists() and not dead.exists()


def test_bad_init_and_world_size():
    with pytest.raises(ValueError, match="two ranks"):
        ShmCommunicator(0, 3, new_shm_init())
    with pytest.raises(ValueError, match="shm://"):
        ShmCommunicator(0, 2, "tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="not an shm link name"):
        ShmCommunicator(0, 2, "shm://../../etc/passwd")
    with pytest.raises(TimeoutError):
        ShmCommunicator(1, 2, new_shm_init(), connect_timeout_s=0.2)


@pytest.mark.parametrize("spin_s, sleeps", [(0.0, True), (1.0, False)])
def test_a_waiter_polls_for_its_spin_before_sleeping(monkeypatch, spin_s, sleeps):
    # The receive is posted before the message is sent. Without polling the waiter sleeps
    # on the doorbell at once, and the message is sent only once it sleeps; polling for
    # 1 s, it takes a message sent 20 ms later without sleeping.
    import adrenaline.transport.shm as shm

    calls, asleep = [], threading.Event()
    real = shm.futex_wait

    def futex_wait(*a):
        calls.append(a)
        asleep.set()
        return real(*a)

    monkeypatch.setattr(shm, "futex_wait", futex_wait)
    a, b = _pair_in_threads()
    try:
        a.set_spin(spin_s)
        got = torch.empty(4)
        handle = a.irecv(got, 1, 7)

        def send():
            if sleeps:
                assert asleep.wait(30)
            else:
                time.sleep(0.02)
            b.send(torch.ones(4), 0, 7)

        sender = threading.Thread(target=send)
        sender.start()
        handle.wait()
        sender.join()
        assert torch.equal(got, torch.ones(4))
        assert bool(calls) is sleeps
    finally:
        a.close()
        b.close()
