"""Tensor transport between real Ray actors: the same contract tests over gloo and over
shared memory (small rings, so large messages stream through them); NCCL only for its
CPU-side errors."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest
import ray
import torch

from adrenaline.transport import find_free_port, make_communicator
from adrenaline.transport.shm import new_shm_init

RAY_TIMEOUT_S = 60  # any hang fails the test instead of blocking the run
GLOO_TIMEOUT_S = 30
SHM_RING_BYTES = 64 * 1024  # far below the largest message, so messages stream through


def _seeded(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The same tensor in every process for the same arguments."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@ray.remote(num_cpus=0)
class Peer:
    """One rank of a gloo world; tensors are made and checked inside the actor."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.comm = None

    def join(self, rank: int, world_size: int, init: str, kind: str = "gloo") -> int:
        self.comm = make_communicator(kind, rank, world_size, init, timeout_s=GLOO_TIMEOUT_S,
                                      capacity_bytes=SHM_RING_BYTES)
        return self.comm.rank

    def send(self, dst: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
             tag: int = 0, transpose: bool = False) -> None:
        t = _seeded(shape, dtype, seed)
        self.comm.send(t.t() if transpose else t, dst, tag)

    def recv(self, src: int, shape: tuple[int, ...], dtype: torch.dtype, tag: int = 0) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype)
        self.comm.recv(buf, src, tag)
        return buf

    def isend_all(self, dst: int, seeds_by_tag: dict[int, int], shape: tuple[int, ...]) -> None:
        handles = [self.comm.isend(_seeded(shape, torch.float32, seed), dst, tag)
                   for tag, seed in seeds_by_tag.items()]  # the tensors live only in the handles
        for h in handles:
            h.wait()

    def irecv_all(self, src: int, tags: list[int], shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
        bufs = {tag: torch.empty(shape) for tag in tags}
        handles = [self.comm.irecv(bufs[tag], src, tag) for tag in tags]
        for h in reversed(handles):
            h.wait()
        return bufs

    def echo(self, src: int, shape: tuple[int, ...], dtype: torch.dtype, iters: int = 1) -> None:
        buf = torch.empty(shape, dtype=dtype)
        for _ in range(iters):
            self.comm.recv(buf, src)
            self.comm.send(buf, src)

    def round_trip(self, dst: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> bool:
        sent = _seeded(shape, dtype, seed)
        back = torch.empty_like(sent)
        self.comm.send(sent, dst)
        self.comm.recv(back, dst)
        return torch.equal(sent, back)

    def ping(self, dst: int, nbytes: int, iters: int) -> list[float]:
        """Per-iteration round-trip seconds of an ``nbytes`` message echoed by ``dst``."""
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        rtts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.comm.send(buf, dst)
            self.comm.recv(buf, dst)
            rtts.append(time.perf_counter() - t0)
        return rtts

    def recv_error(self, src: int) -> str:
        """The exception a recv into a non-contiguous tensor raises, before any transfer."""
        try:
            self.comm.recv(torch.empty(4, 4).t(), src)
        except ValueError as e:
            return f"ValueError: {e}"
        return "no error"

    def kind(self) -> str:
        return type(self.comm).__name__.removesuffix("Communicator").lower()

    def same_tag_in_order(self, peer: int, n: int, send: bool) -> list[int]:
        """``n`` messages on one tag, posted at once: each is matched in posting order."""
        if send:
            handles = [self.comm.isend(torch.full((33,), i, dtype=torch.int64), peer, 5)
                       for i in range(n)]
            for h in handles:
                h.wait()
            return []
        bufs = [torch.empty(33, dtype=torch.int64) for _ in range(n)]
        handles = [self.comm.irecv(b, peer, 5) for b in bufs]
        for h in reversed(handles):
            h.wait()
        return [int(b[0]) for b in bufs if torch.all(b == b[0])]

    def zero_size(self, peer: int) -> bool:
        """Zero-element sends and receives complete at once, without the peer."""
        self.comm.isend(torch.empty(0), peer, 3).wait()
        self.comm.irecv(torch.empty(0, 4), peer, 3).wait()
        return True

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()


def _world(n: int, kind: str = "gloo") -> list:
    """``n`` actors joined into one world; all join concurrently (the rendezvous blocks)."""
    peers = [Peer.remote() for _ in range(n)]
    init = new_shm_init() if kind == "shm" else f"tcp://127.0.0.1:{find_free_port()}"
    ranks = ray.get([p.join.remote(r, n, init, kind) for r, p in enumerate(peers)],
                    timeout=RAY_TIMEOUT_S)
    assert ranks == list(range(n))
    return peers


def _teardown(peers: list) -> None:
    try:
        ray.get([p.close.remote() for p in peers], timeout=RAY_TIMEOUT_S)
    finally:
        for p in peers:
            ray.kill(p)


@pytest.fixture(scope="module", params=["gloo", "shm"])
def pair(ray_cluster, request):
    peers = _world(2, request.param)
    yield peers
    _teardown(peers)


def _get(refs):
    return ray.get(refs, timeout=RAY_TIMEOUT_S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exchange_both_directions(pair, dtype):
    a, b = pair
    shape = (3, 257)
    for (src, s_rank), (dst, d_rank), seed in [((a, 0), (b, 1), 1), ((b, 1), (a, 0), 2)]:
        _, got = _get([src.send.remote(d_rank, shape, dtype, seed), dst.recv.remote(s_rank, shape, dtype)])
        assert got.dtype == dtype and torch.equal(got, _seeded(shape, dtype, seed))


def test_non_contiguous_send_and_recv(pair):
    a, b = pair
    _, got = _get([a.send.remote(1, (5, 7), torch.float32, 3, transpose=True),
                   b.recv.remote(0, (7, 5), torch.float32)])
    assert torch.equal(got, _seeded((5, 7), torch.float32, 3).t())
    assert _get(b.recv_error.remote(0)).startswith("ValueError")


def test_tags_are_independent(pair):
    a, b = pair
    shape = (64,)
    seeds = {7: 70, 9: 90}  # sender posts tag 7 first; receiver posts tag 9 first
    _, got = _get([a.isend_all.remote(1, seeds, shape), b.irecv_all.remote(0, [9, 7], shape)])
    for tag, seed in seeds.items():
        assert torch.equal(got[tag], _seeded(shape, torch.float32, seed))


def test_same_tag_matches_in_posting_order(pair):
    a, b = pair
    _, got = _get([a.same_tag_in_order.remote(1, 40, True), b.same_tag_in_order.remote(0, 40, False)])
    assert got == list(range(40))


def test_zero_size_is_a_no_op(pair):
    a, b = pair
    assert _get([a.zero_size.remote(1), b.zero_size.remote(0)]) == [True, True]


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 16_385, 3 * SHM_RING_BYTES + 7])
def test_message_sizes(pair, numel):
    a, b = pair
    _, got = _get([a.send.remote(1, (numel,), torch.uint8, numel),
                   b.recv.remote(0, (numel,), torch.uint8)])
    assert torch.equal(got, _seeded((numel,), torch.uint8, numel))


def test_world_of_three_fan_out(ray_cluster):
    peers = _world(3)
    try:
        shape = (16, 8)
        got = _get([peers[0].send.remote(1, shape, torch.bfloat16, 11),
                    peers[0].send.remote(2, shape, torch.bfloat16, 22),
                    peers[1].recv.remote(0, shape, torch.bfloat16),
                    peers[2].recv.remote(0, shape, torch.bfloat16)])
        assert torch.equal(got[2], _seeded(shape, torch.bfloat16, 11))
        assert torch.equal(got[3], _seeded(shape, torch.bfloat16, 22))
    finally:
        _teardown(peers)


def test_large_round_trip_and_latency(pair):
    a, b = pair
    kind = _get(a.kind.remote())
    shape = (2 * 1024 * 1024,)  # 8 MiB of float32
    ok, _ = _get([a.round_trip.remote(1, shape, torch.float32, 5), b.echo.remote(0, shape, torch.float32)])
    assert ok
    iters, warmup = 200, 20
    for nbytes in (4 * 1024, 64 * 1024):
        rtts, _ = _get([a.ping.remote(1, nbytes, iters), b.echo.remote(0, (nbytes,), torch.uint8, iters)])
        rtts = rtts[warmup:]
        print(f"\n{kind} round trip {nbytes // 1024} KiB: median {statistics.median(rtts) * 1e6:.0f} us, "
              f"min {min(rtts) * 1e6:.0f} us over {len(rtts)} iterations")


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        make_communicator("bogus", 0, 2, "tcp://127.0.0.1:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_nccl_without_cuda_is_a_clear_error():
    from adrenaline.transport.nccl import NcclCommunicator

    with pytest.raises(RuntimeError, match="CUDA"):
        NcclCommunicator(2, "00" * 128, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        make_communicator("nccl", 0, 2, "00" * 128)


def test_modules_import_without_loading_cupy():
    code = ("import sys, adrenaline.transport, adrenaline.transport.gloo, adrenaline.transport.nccl; "
            "assert 'cupy' not in sys.modules, 'cupy imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
