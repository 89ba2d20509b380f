"""Offloaded attention called in-line: the executor lives in the decode engine's process.

The drop-in for RemoteAttention when the executors are AttentionService
objects on the same device (engine/colocated.py): no messages and no
executor thread. Each step's metadata is built on the executor once
(``begin_step``); per layer, ``start`` launches the executor's attention on
its own stream (on CUDA a green-context stream bounds its SM share), after
an event that orders it behind the q/k/v the decode stream produced, and
``finish`` makes the decode stream wait for the result. On CPU both run in
order on the calling thread.

Invariant: ``start`` is called once per executor per layer, layers in order,
between ``begin_step`` and ``end_step`` (as the runner's split attention does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adrenaline.engine.attention_service import AttentionService, ExecutorStep
from adrenaline.engine.request import Request


@dataclass
class _Pending:
    out: torch.Tensor
    done: torch.cuda.Event | None


class InlineRemoteAttention:
    def __init__(self, executors: list[AttentionService], streams: list | None = None):
        self.executors = executors
        self.streams = streams or [None] * len(executors)
        self._steps: dict[int, ExecutorStep] = {}
        self._layer: dict[int, int] = {}
        self.num_round_trips = 0
        self.round_trip_s = 0.0  # host time spent waiting for executor results

    def begin_step(self, groups: dict[int, list[Request]]) -> None:
        for e, reqs in groups.items():
            self._steps[e] = self.executors[e].begin_step([r.remote_handle for r in reqs],
                                                          [r.num_tokens for r in reqs])
            self._layer[e] = 0

    def start(self, executor: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Pending:
        service, stream = self.executors[executor], self.streams[executor]
        layer = self._layer[executor]
        self._layer[executor] = layer + 1
        if stream is None:
            return _Pending(service.attend(self._steps[executor], layer, q, k, v), None)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            for t in (q, k, v):  # made on the decode stream, read on the executor's
                t.record_stream(stream)
            out = service.attend(self._steps[executor], layer, q, k, v)
            done = torch.cuda.Event()
            done.record(stream)
        return _Pending(out, done)

    def finish(self, pending: _Pending) -> torch.Tensor:
        start = time.perf_counter()
        if pending.done is not None:
            current = torch.cuda.current_stream(pending.out.device)
            current.wait_event(pending.done)
            pending.out.record_stream(current)
        self.round_trip_s += time.perf_counter() - start
        self.num_round_trips += 1
        return pending.out

    def end_step(self) -> None:
        for e, step in self._steps.items():
            self.executors[e].end_step(step)
        self._steps.clear()
        self._layer.clear()
