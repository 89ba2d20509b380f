"""Continuous-batching scheduler: FCFS admission, prefill token budget, preemption by recompute.

Each call to ``schedule()`` returns one step: a prefill of newly admitted
requests when any fit (prefill first keeps TTFT low), else one decode token
for every running request. When decode runs out of KV blocks the newest
running request is preempted: its blocks are freed and it goes back to the
front of the queue, to be prefilled again over all its tokens.

Prefix caching (when the block manager has it on): a request admitted to
prefill shares the cached blocks of its longest cached full-block prefix and
computes only the tokens after it. At least one token is always computed
(its logits give the first sample), so a prompt cached whole recomputes its
last block. A request that asks for prompt logprobs does not read the cache: its
whole prompt is computed, since a cached prefix has no logits (its blocks are
still registered in the cache once written).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.prompt_logprobs import wants_prompt_logprobs
from adrenaline.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's plan, handed to the runner as plain data."""

    is_prefill: bool
    requests: list[Request]
    query_lens: list[int]
    context_lens: list[int]
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.num_preemptions = 0  # total since start, for metrics and tests
        # Prefix cache use since start: tokens prefilled (cached or computed), and of
        # those, tokens whose KV came from the cache.
        self.num_prefill_tokens = 0
        self.num_cached_tokens = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput | None:
        out = self.schedule_prefill()
        if out is None and self.running:
            out = self._schedule_decode()
        return out

    def schedule_prefill(self) -> SchedulerOutput | None:
        """Admit waiting requests FCFS under the token budget; None when none fit."""
        admitted: list[Request] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            req = self.waiting[0]
            # At least one token is computed: never the whole sequence from the cache.
            cached = ([] if wants_prompt_logprobs(req) else
                      self.bm.match_prefix(req.token_ids, (req.num_tokens - 1) // self.bm.block_size))
            num_cached = len(cached) * self.bm.block_size
            # A prompt longer than the budget still runs, alone.
            if admitted and req.num_tokens - num_cached > budget:
                break
            if not self.bm.can_allocate(req.num_tokens, cached):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.bm.allocate(req.request_id, req.num_tokens, cached)
            req.status = RequestStatus.RUNNING
            req.num_computed = num_cached
            req.num_cached_tokens = num_cached
            self.num_prefill_tokens += req.num_tokens
            self.num_cached_tokens += num_cached
            admitted.append(req)
            budget -= req.num_tokens - num_cached
        if not admitted:
            return None
        self.running.extend(admitted)
        return SchedulerOutput(True, admitted, [r.num_tokens - r.num_computed for r in admitted],
                               [r.num_computed for r in admitted])

    def _schedule_decode(self) -> SchedulerOutput:
        # Offloaded requests hold no blocks here (their KV grows on an executor), so
        # only local requests compete for blocks and only they can be preempted.
        # (Runs once per decode step over the whole batch: kept to plain loops.)
        local = deque(r for r in self.running if r.executor is None)
        grow = self.bm.grow
        preempted: list[Request] = []
        while local:
            req = local.popleft()
            # The step writes KV for the last token: cover num_tokens in total.
            while not grow(req.request_id, len(req.token_ids)):
                victim = local.pop() if local else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
        if preempted:
            gone = set(map(id, preempted))
            scheduled = [r for r in self.running if id(r) not in gone]
        else:
            scheduled = self.running
        self.running = list(scheduled)  # the plan keeps its own list: finish() edits running
        return SchedulerOutput(False, scheduled, [1] * len(scheduled),
                               [len(r.token_ids) - 1 for r in scheduled], preempted)

    def _preempt(self, req: Request) -> None:
        self.bm.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Victims are taken newest first, so pushing each to the front keeps FCFS order.
        self.waiting.appendleft(req)

    def detach(self, req: Request) -> None:
        """Take a running request out of scheduling, keeping its blocks (KV handoff)."""
        self.running.remove(req)

    def adopt(self, req: Request) -> None:
        """Take in a RUNNING request whose blocks were allocated (and filled) elsewhere."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self.running.sort(key=lambda r: r.arrival)

    def finish(self, req: Request) -> None:
        """Release a finished (or aborted) request's blocks and forget it."""
        if req in self.running:
            self.running.remove(req)
            if not req.is_offloaded:
                self.bm.free(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
