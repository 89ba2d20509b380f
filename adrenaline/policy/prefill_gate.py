"""The prefill gate: prefill only what decode can take (``limits.prefill_when_admissible``).

Without it a request is prefilled at once and then waits PARKED, its first token out,
until the policy admits it to decode; at a saturating rate that wait lands between its
first and second tokens, in the client's TPOT. With it (as SGLang's PD disaggregation,
whose decode side pre-allocates before prefill runs) the request waits *before* its
prefill, still WAITING, so the wait lands in its TTFT instead.

Rule: a request enters the gate once placed and passes it, in arrival order (the head
blocks those behind it, so small requests cannot starve a large one), once
``policy.admit(req, where, load)`` would admit it now. Passing counts the decision in the
load as if admitted (``load.gated``: its decode or executor capacity held while it
prefills), so the requests gated through and not yet admitted are counted by every later
question, at the gate or at admission, and a burst cannot all pass at once and then park.
Just before its real admission (after prefill) the reservation is taken back
(``load.ungated``, the exact inverse) and the policy asked again as without the gate;
a refusal there (an estimate was off) parks it as without the gate: the fallback.

An entry is QUEUED (counts nothing beyond its placement), then PASSED (its decision's
capacity counted), then TAKEN (back to the gateless ledger); ``leave`` ends it from any
of them, taking back what it counted. Invariant: once every entry is TAKEN or has left,
the gate counts nothing in any load.

Pure (no clock, no asyncio): the router (serve/admission.py) and the simulator
(sim/router.py) drive it alike. Whoever frees capacity re-asks its parked waiters first
and then ``pump``s the gate.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Callable

from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy
from adrenaline.policy.load import gated, ungated
from adrenaline.protocol import GenerateRequest


class GateState(enum.Enum):
    QUEUED = "queued"
    PASSED = "passed"
    TAKEN = "taken"
    LEFT = "left"


@dataclass(eq=False)
class GateEntry:
    """One request at the gate: what it counts (``reserved``/``mean`` as in the ledger)
    in ``load``; ``on_pass`` runs when it passes (e.g. wakes its waiter)."""

    req: GenerateRequest
    where: Placement
    load: ClusterLoad
    reserved: int
    mean: int
    on_pass: Callable[[GateEntry], None] | None = None
    decision: Placement | None = None  # the gate's decision (counted while PASSED)
    state: GateState = GateState.QUEUED
    waiter: object = None  # the driver's own (the router's future, the simulator's request)


class PrefillGate:
    def __init__(self, policy: PlacementPolicy):
        self.policy = policy
        self._queue: deque[GateEntry] = deque()  # QUEUED entries, in arrival order
        self.num_passed = 0  # PASSED entries: gated through, not yet admitted

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def enter(self, entry: GateEntry) -> bool:
        """Queue ``entry`` behind those already waiting; whether it passed at once."""
        self._queue.append(entry)
        self.pump()
        return entry.state is GateState.PASSED

    def pump(self) -> list[GateEntry]:
        """Pass entries from the head while the policy would admit them; those passed."""
        passed = []
        while self._queue:
            e = self._queue[0]
            decision = self.policy.admit(e.req, e.where, e.load)
            if decision is None:
                break
            self._queue.popleft()
            gated(e.load, decision, e.reserved, e.mean)
            e.decision, e.state = decision, GateState.PASSED
            self.num_passed += 1
            passed.append(e)
            if e.on_pass is not None:
                e.on_pass(e)
        return passed

    def take(self, entry: GateEntry) -> bool:
        """PASSED -> TAKEN: its reservation back to pending, just before its real admission.
        Whether it held one (else nothing changes)."""
        if entry.state is not GateState.PASSED:
            return False
        ungated(entry.load, entry.decision, entry.reserved, entry.mean)
        entry.state = GateState.TAKEN
        self.num_passed -= 1
        return True

    def leave(self, entry: GateEntry) -> bool:
        """It ended (finished, cancelled, failed or lost) wherever it was: take back what it
        counted. Whether capacity was freed for others (its reservation, or the head of the
        queue, which blocked those behind it): then wake the waiters and pump."""
        if entry.state is GateState.QUEUED:
            head = self._queue[0] is entry
            self._queue.remove(entry)
            entry.state = GateState.LEFT
            return head
        freed = self.take(entry)
        entry.state = GateState.LEFT
        return freed
