"""Simulated instances: the real Scheduler and BlockManager, with step times from the cost model.

Each mirrors what its actor does between steps (actors/prefill.py, decode.py,
attention_executor.py); the simulator only replaces the model's forward pass
by ``CostModel``'s step time and the sampled token by a placeholder id.
"""

from __future__ import annotations

from collections import deque

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.request import Request
from adrenaline.engine.scheduler import Scheduler, SchedulerOutput
from adrenaline.sim.cost import CostModel

TOKEN = 3  # the id every simulated step "samples" (no request stops on it)


def _engine(kv_tokens: int, block_size: int, max_num_seqs: int, max_batched: int
            ) -> tuple[BlockManager, Scheduler]:
    bm = BlockManager(max(kv_tokens // block_size, 1), block_size)
    return bm, Scheduler(bm, max_num_seqs, max_batched)


def run_plan(plan: SchedulerOutput) -> None:
    """What EngineCore._run does to each request of a step: one more token, computed KV.

    Simulated requests ignore EOS and have no stop ids, so Request.append_token would end
    them exactly at ``end_len`` (prompt + max_tokens, set by the simulator); done inline
    here because this loop runs once per simulated token.
    """
    for req in plan.requests:
        ids = req.token_ids
        req.num_computed = len(ids)
        ids.append(TOKEN)
        if len(ids) >= req.end_len:
            req.finish_reason = "length"


class SimPrefill:
    """Prefill role: FCFS prefill steps; a prefilled request's blocks stay held until handoff."""

    def __init__(self, index: int, kv_tokens: int, block_size: int, max_num_seqs: int,
                 max_batched: int):
        self.index = index
        self.bm, self.scheduler = _engine(kv_tokens, block_size, max_num_seqs, max_batched)
        self.busy = False
        self.num_steps = 0

    def next_step(self) -> SchedulerOutput | None:
        return self.scheduler.schedule_prefill()

    def finish_step(self, plan: SchedulerOutput) -> None:
        run_plan(plan)
        for req in plan.requests:
            if req.finish_reason is not None:
                self.scheduler.finish(req)
            else:
                self.scheduler.detach(req)  # held: blocks kept until the handoff
        self.num_steps += 1

    def release(self, req: Request) -> None:
        """The KV left (send_kv / take_kv) or the request ended: free its blocks."""
        self.bm.free(req.request_id)


class SimExecutor:
    """Attention executor: the KV of offloaded requests, grown by one token per decode step."""

    def __init__(self, index: int, kv_tokens: int, block_size: int):
        self.index = index
        self.bm = BlockManager(max(kv_tokens // block_size, 1), block_size)
        self.capacity_tokens = self.bm.num_blocks * block_size
        self.kv_tokens = 0  # tokens held now (for bandwidth and use over time)
        # Steps whose KV did not fit (block rounding beyond the policy's token count).
        self.overflows = 0

    def adopt(self, req: Request) -> None:
        self.bm.allocate(req.request_id, req.num_tokens)
        self.kv_tokens += req.num_tokens

    def step(self, req: Request) -> None:
        """One decode step of ``req``: its KV covers num_tokens after it."""
        if self.bm.can_append(req.request_id, req.num_tokens):
            self.bm.append(req.request_id, req.num_tokens)
        else:
            self.overflows += 1
        self.kv_tokens += 1

    def free(self, req: Request) -> None:
        self.bm.free(req.request_id)
        self.kv_tokens -= req.num_tokens


class SimDecode:
    """Decode role: adopts parked requests between steps (oldest first, while blocks last),
    then one scheduler step (a recompute prefill after preemption, else a decode step)."""

    def __init__(self, index: int, kv_tokens: int, block_size: int, max_num_seqs: int,
                 max_batched: int):
        self.index = index
        self.bm, self.scheduler = _engine(kv_tokens, block_size, max_num_seqs, max_batched)
        self.parked: deque[Request] = deque()
        self.busy = False
        self._arrivals = 0
        self.num_steps = 0
        self.batch_sum = 0
        self.step_time_s = 0.0
        self.kv_read_bytes = 0.0  # offloaded KV its executors read (for bandwidth over time)
        self.remote_wait_s = 0.0  # waited on executors beyond local attention (cost.py)
        self.local_kv_sum = 0  # KV tokens its steps' local attention read (as the live metric)
        self.num_offloaded_steps = 0

    def adopt_parked(self) -> None:
        while self.parked and (self.parked[0].is_offloaded
                               or self.bm.can_allocate(self.parked[0].num_tokens)):
            req = self.parked.popleft()
            if not req.is_offloaded:
                self.bm.allocate(req.request_id, req.num_tokens)
            req.arrival = self._arrivals  # EngineCore.adopt: FCFS order from adoption
            self._arrivals += 1
            self.scheduler.adopt(req)

    def next_step(self) -> SchedulerOutput | None:
        self.adopt_parked()
        return self.scheduler.schedule() if self.scheduler.has_unfinished else None

    def step_time(self, plan: SchedulerOutput, cost: CostModel) -> float:
        if plan.is_prefill:  # recompute of preempted requests (no executor on this device)
            return cost.prefill_s(plan.query_lens, plan.context_lens)
        local_kv, remote = 0, {}
        for req in plan.requests:
            if req.executor is None:
                local_kv += len(req.token_ids)
            else:
                n, kv = remote.get(req.executor, (0, 0))
                remote[req.executor] = (n + 1, kv + len(req.token_ids))
        # Executors work in parallel; the step waits for the slowest.
        worst = max(remote.values(), key=lambda v: v[1], default=(0, 0))
        self.kv_read_bytes += sum(kv for _, kv in remote.values()) * cost.kv_bytes
        self.local_kv_sum += local_kv
        if remote:
            self.num_offloaded_steps += 1
            self.remote_wait_s += cost.remote_wait_s(local_kv, worst[0], worst[1])
        return cost.decode_s(len(plan.requests), local_kv, worst[0], worst[1],
                             sum(n for n, _ in remote.values()))

    def finish_step(self, plan: SchedulerOutput, executors: list[SimExecutor],
                    duration: float, now: float) -> list[Request]:
        """Apply the step at time ``now``; returns the requests that finished."""
        run_plan(plan)
        done = []
        decode = not plan.is_prefill
        for req in plan.requests:
            if decode and req.executor is not None:
                executors[req.executor].step(req)
            times = req.sim.token_times
            if times is not None:
                times.append(now)
            if req.finish_reason is not None:
                self.scheduler.finish(req)
                done.append(req)
        self.num_steps += 1
        self.batch_sum += len(plan.requests)
        self.step_time_s += duration
        return done
