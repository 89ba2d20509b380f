"""The router's decisions in simulated time: the real policy, at the points the router asks it.

Mirrors serve/router.py's ``_attempt`` through the same stages (serve/attempt.py's
``Stage``): WAITING at arrival (placed; load: placed), PREFILLING in its prefill step,
PARKED at its first token (load: prefilled) until admitted (re-asked in arrival order
whenever capacity frees, as the router's waiters are), DECODING_LOCAL (the prefill pool
frees its blocks and the KV travels over the link) or DECODING_OFFLOADED (to the
executor beside the prefill instance), DONE at release. No actor is lost here, so no
request is ever LOST. ClusterLoad is built by the router's own builder and moved by
policy/load.py's transitions.

With ``prefill_when_admissible`` (the router's ``limits.prefill_when_admissible``) a placed
request waits WAITING at the same prefill gate (policy/prefill_gate.py) before its
prefill; passed ones collect in ``gate_passed`` for the simulation to start. As in the
router: its reservation is taken back just before its admission, and freed capacity
re-asks the parked waiters first, then pumps the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from adrenaline.engine.request import Request
from adrenaline.policy import Placement, PlacementPolicy
from adrenaline.policy.load import admitted, new_cluster_load, placed, prefilled, released
from adrenaline.policy.prefill_gate import GateEntry, PrefillGate
from adrenaline.protocol import GenerateRequest
from adrenaline.serve.attempt import Stage


@dataclass(eq=False)
class SimRequest:
    """One request's trip: its router-side request, engine-side state and timeline."""

    greq: GenerateRequest
    req: Request
    arrival_s: float
    reserved: int  # KV at its maximum length
    mean_kv: int  # KV averaged over its life (policy/base.py's life_mean_tokens)
    where: Placement | None = None
    decision: Placement | None = None
    first_token_s: float | None = None
    admitted_s: float | None = None  # when admitted to decode (its handoff starts)
    gate: GateEntry | None = None  # its prefill gate entry (gate on)
    end_s: float | None = None
    token_times: list[float] | None = None  # every token's time, for a sample of requests
    n_out: int = 0  # output tokens, set when it ends
    stage: Stage = Stage.WAITING

    @property
    def offloaded(self) -> bool:
        return self.stage is Stage.DECODING_OFFLOADED


class SimRouter:
    def __init__(self, policy: PlacementPolicy, num_prefill: int, decode_capacity: list[int],
                 executor_capacity: list[int], block_size: int = 1,
                 prefill_when_admissible: bool = False):
        self.policy = policy
        self.load = new_cluster_load(num_prefill, decode_capacity, executor_capacity,
                                     block_size=block_size)
        self.waiters: list[SimRequest] = []  # waiting for admission, in arrival order
        self.gate = PrefillGate(policy) if prefill_when_admissible else None
        self.gate_passed: list[SimRequest] = []  # passed the gate, prefill not started yet
        self.admission_log: list[tuple[str, int, int, bool]] = []
        self.num_placed = 0
        self.num_offloaded = 0

    def place(self, r: SimRequest) -> Placement:
        r.where = self.policy.place(r.greq, self.load)
        placed(self.load, r.where, r.reserved)
        self.num_placed += 1
        return r.where

    def enter_gate(self, r: SimRequest) -> bool:
        """Whether its prefill may start now (always, with the gate off); else it waits at
        the gate and shows up in ``gate_passed`` once it passes."""
        if self.gate is None:
            return True
        r.gate = GateEntry(r.greq, r.where, self.load, r.reserved, r.mean_kv, waiter=r,
                           on_pass=lambda e: self.gate_passed.append(e.waiter))
        passed = self.gate.enter(r.gate)
        if passed:
            self.gate_passed.remove(r)  # (started by the caller at once)
        return passed

    def prefilled(self, r: SimRequest) -> None:
        prefilled(self.load, r.where)
        r.stage = Stage.PARKED

    def admit_prefilled(self, r: SimRequest) -> list[SimRequest]:
        """Its first admission, after prefill (its gate reservation taken back first); the
        requests admitted now, ``r`` first if it is (a refusal frees that reservation:
        parked waiters may fit)."""
        took = self.gate is not None and r.gate is not None and self.gate.take(r.gate)
        if self.try_admit(r) is not None:
            return [r]
        if not took:
            return []
        self.waiters.remove(r)  # as the router's: not woken by the capacity it freed itself
        out = self.capacity_freed()
        self.waiters.append(r)
        return out

    def try_admit(self, r: SimRequest) -> Placement | None:
        """The policy's admission; a refused request waits for freed capacity."""
        decision = self.policy.admit(r.greq, r.where, self.load)
        if decision is None:
            self.waiters.append(r)
            return None
        admitted(self.load, decision, r.reserved, r.mean_kv)
        r.decision = decision
        r.stage = Stage.DECODING_OFFLOADED if decision.offload else Stage.DECODING_LOCAL
        self.num_offloaded += decision.offload
        self.admission_log.append((r.greq.request_id, decision.prefill, decision.decode,
                                   decision.offload))
        return decision

    def release(self, r: SimRequest) -> list[SimRequest]:
        """It ended; returns the waiters admitted on the capacity it freed, in order."""
        freed = self.gate is not None and r.gate is not None and self.gate.leave(r.gate)
        released(self.load, r.where, r.decision, r.reserved, r.mean_kv)
        r.stage = Stage.DONE
        if r.decision is None and not freed:
            return []
        return self.capacity_freed()

    def capacity_freed(self) -> list[SimRequest]:
        """Parked waiters re-ask first (those admitted are returned), then the gate pumps
        (those passed join ``gate_passed``)."""
        waiters, self.waiters = self.waiters, []
        out = [w for w in waiters if self.try_admit(w) is not None]
        if self.gate is not None:
            self.gate.pump()
        return out
