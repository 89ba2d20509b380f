"""Decode side of attention offloading: one step's exchange with the attention executors.

Per step, each executor serving some of the batch gets one header + metadata
message (its requests' handles and sequence lengths). Per layer, it gets one
packed [n, (Hq + 2 Hkv) * D] message of those requests' q, k, v and answers
with their attention output [n, Hq, D]. Sends and receives are posted
non-blocking so local attention runs while the executors work.

Invariant: messages on one (decode, executor) pair are matched in posting
order per tag, and a step's messages are all posted before the next step's,
so the executor can serve a fixed sequence: header, meta, then L x (qkv -> out).

When an executor is lost mid-step (its link raises ``PeerLostError``), the
step cannot finish, but the surviving executors are somewhere in that same
sequence. ``abandon_step`` walks each survivor to the end of it (zeros for the
layers not sent yet, outputs discarded), so their next message is the next
step's header, and returns the executors that failed. The zeros write KV only
at the step's new position, which the retried step writes again: a decode step
changes nothing a client sees until it completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from adrenaline.config import ModelConfig
from adrenaline.engine.request import Request
from adrenaline.transport.base import CommHandle, Communicator
from adrenaline.transport.mesh import PeerLostError

TAG_HEADER, TAG_META, TAG_QKV, TAG_OUT = 1, 2, 3, 4
# Waiters on an exchange link (the decode for a layer's outputs, the executor for the next
# layer's q, k, v) busy-poll this long before sleeping (Communicator.set_spin). A layer's
# work on the other side is shorter, so within a step neither side sleeps and no layer
# pays a sleeping core's wake-up (docs/BENCHMARKS.md: the decode's wait per layer fell
# from 0.68 to 0.39 ms). Between steps they sleep after this long.
EXCHANGE_SPIN_S = 5e-3


def exchange_message_bytes(model: ModelConfig, dtype: torch.dtype, max_batch: int) -> int:
    """The largest message of a decode step's exchange with one executor: the packed
    q, k, v of ``max_batch`` requests for one layer (the output and metadata are smaller)."""
    width = (model.num_attention_heads + 2 * model.num_key_value_heads) * model.head_dim
    elt = torch.empty(0, dtype=dtype).element_size()
    return max(max_batch * width * elt, max_batch * 2 * 8)


@dataclass
class PendingAttention:
    send: CommHandle
    recv: CommHandle
    out: torch.Tensor
    packed: torch.Tensor  # kept alive until the send completes
    executor: int = -1
    done: bool = False


@dataclass
class _Progress:
    """How far this step's exchange with one executor has got."""

    num_requests: int
    sends: list[tuple[CommHandle, torch.Tensor]] = field(default_factory=list)
    layers_sent: int = 0
    pending: PendingAttention | None = None


class ExecutorsLostError(RuntimeError):
    """A decode step failed because these executors (indices) were lost; the step can be
    retried once they are replaced and their requests dropped."""

    def __init__(self, executors: set[int]):
        super().__init__(f"attention executors {sorted(executors)} were lost mid-step")
        self.executors = executors


class RemoteAttention:
    """``num_layers`` and ``dtype`` let ``abandon_step`` finish a step's sequence with the
    surviving executors (without them a lost executor fails every executor of the step)."""

    def __init__(self, comm: Communicator, executor_ranks: list[int], num_heads: int,
                 num_kv_heads: int, head_dim: int, num_layers: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        self.comm = comm
        self.ranks = executor_ranks
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device
        self._step: dict[int, _Progress] = {}
        self.num_round_trips = 0
        self.round_trip_s = 0.0  # time spent waiting for remote outputs (not overlapped)
        # The executor being waited on now (-1: none) and since when (perf_counter).
        self.waiting_on, self.waiting_since = -1, 0.0

    def waiting(self) -> tuple[int, float]:
        """(executor waited on now or -1, seconds waited so far): read by metrics()."""
        e, since = self.waiting_on, self.waiting_since
        return (e, time.perf_counter() - since) if e >= 0 else (-1, 0.0)

    def _wait(self, executor: int, *handles: CommHandle) -> None:
        self.waiting_since, self.waiting_on = time.perf_counter(), executor
        try:
            for h in handles:
                h.wait()
        finally:
            self.waiting_on = -1

    def begin_step(self, groups: dict[int, list[Request]]) -> None:
        """Send each executor the step's metadata: (handle, tokens incl. the new one) per request."""
        self._step = {}
        for executor, reqs in groups.items():
            header = torch.tensor([len(reqs)], dtype=torch.int64)
            meta = torch.tensor([[r.remote_handle, r.num_tokens] for r in reqs], dtype=torch.int64)
            rank = self.ranks[executor]
            progress = _Progress(len(reqs))
            self._step[executor] = progress
            progress.sends.append((self.comm.isend(header, rank, TAG_HEADER), header))
            progress.sends.append((self.comm.isend(meta, rank, TAG_META), meta))

    def start(self, executor: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> PendingAttention:
        n = q.shape[0]
        packed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1)
        rank = self.ranks[executor]
        out = torch.empty(n, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        progress = self._step.get(executor)
        recv = self.comm.irecv(out, rank, TAG_OUT)
        send = self.comm.isend(packed, rank, TAG_QKV)
        pending = PendingAttention(send=send, recv=recv, out=out, packed=packed,
                                   executor=executor)
        if progress is not None:
            progress.layers_sent += 1
            progress.pending = pending
        return pending

    def finish(self, pending: PendingAttention) -> torch.Tensor:
        start = time.perf_counter()
        self._wait(pending.executor, pending.recv, pending.send)
        pending.done = True
        self.round_trip_s += time.perf_counter() - start
        self.num_round_trips += 1
        return pending.out

    def end_step(self) -> None:
        step, self._step = self._step, {}
        for progress in step.values():
            for handle, _ in progress.sends:
                handle.wait()

    def abandon_step(self, failed_rank: int | None) -> set[int]:
        """After a failed step: finish the step's sequence with every executor that still
        answers; returns the indices of those that do not (``failed_rank``'s included)."""
        step, self._step = self._step, {}
        failed = {self.ranks.index(failed_rank)} if failed_rank in self.ranks else set()
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        for executor, progress in step.items():
            if executor in failed:
                continue
            if self.num_layers is None or self.dtype is None:
                failed.add(executor)  # cannot finish its sequence: treat it as lost too
                continue
            rank = self.ranks[executor]
            n = progress.num_requests
            try:
                if progress.pending is not None and not progress.pending.done:
                    self._wait(executor, progress.pending.recv, progress.pending.send)
                for _ in range(progress.layers_sent, self.num_layers):
                    packed = torch.zeros(n, (hq + 2 * hkv) * d, dtype=self.dtype,
                                         device=self.device)
                    out = torch.empty(n, hq, d, dtype=self.dtype, device=self.device)
                    recv = self.comm.irecv(out, rank, TAG_OUT)
                    self._wait(executor, self.comm.isend(packed, rank, TAG_QKV), recv)
                for handle, _ in progress.sends:
                    handle.wait()
            except PeerLostError:
                failed.add(executor)
        return failed
