"""Decode side of attention offloading: one step's exchange with the attention executors.

Per step, each executor serving some of the batch gets one header + metadata
message (its requests' handles and sequence lengths). Per layer, it gets one
packed [n, (Hq + 2 Hkv) * D] message of those requests' q, k, v and answers
with their attention output [n, Hq, D]. Sends and receives are posted
non-blocking so local attention runs while the executors work.

Invariant: messages on one (decode, executor) pair are matched in posting
order per tag, and a step's messages are all posted before the next step's,
so the executor can serve a fixed sequence: header, meta, then L x (qkv -> out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adrenaline.engine.request import Request
from adrenaline.transport.base import CommHandle, Communicator

TAG_HEADER, TAG_META, TAG_QKV, TAG_OUT = 1, 2, 3, 4


@dataclass
class PendingAttention:
    send: CommHandle
    recv: CommHandle
    out: torch.Tensor
    packed: torch.Tensor  # kept alive until the send completes


class RemoteAttention:
    def __init__(self, comm: Communicator, executor_ranks: list[int], num_heads: int,
                 num_kv_heads: int, head_dim: int):
        self.comm = comm
        self.ranks = executor_ranks
        self.num_heads = num_heads
        self.head_dim = head_dim
        self._step_sends: list[tuple[CommHandle, torch.Tensor]] = []
        self.num_round_trips = 0
        self.round_trip_s = 0.0  # time spent waiting for remote outputs (not overlapped)

    def begin_step(self, groups: dict[int, list[Request]]) -> None:
        """Send each executor the step's metadata: (handle, tokens incl. the new one) per request."""
        for executor, reqs in groups.items():
            header = torch.tensor([len(reqs)], dtype=torch.int64)
            meta = torch.tensor([[r.remote_handle, r.num_tokens] for r in reqs], dtype=torch.int64)
            rank = self.ranks[executor]
            self._step_sends.append((self.comm.isend(header, rank, TAG_HEADER), header))
            self._step_sends.append((self.comm.isend(meta, rank, TAG_META), meta))

    def start(self, executor: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> PendingAttention:
        n = q.shape[0]
        packed = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1)
        rank = self.ranks[executor]
        out = torch.empty(n, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        recv = self.comm.irecv(out, rank, TAG_OUT)
        send = self.comm.isend(packed, rank, TAG_QKV)
        return PendingAttention(send=send, recv=recv, out=out, packed=packed)

    def finish(self, pending: PendingAttention) -> torch.Tensor:
        import time

        start = time.perf_counter()
        pending.recv.wait()
        pending.send.wait()
        self.round_trip_s += time.perf_counter() - start
        self.num_round_trips += 1
        return pending.out

    def end_step(self) -> None:
        for handle, _ in self._step_sends:
            handle.wait()
        self._step_sends.clear()
