"""Admission at the router: the limits, the wait for decode capacity, the load ledger.

* Limits (``AppArgs.limits``): beyond them a request is refused at once
  (``OverloadedError`` -> HTTP 429). ``num_ongoing`` counts the generation requests the
  router holds, ``num_queued`` those placed but not yet admitted to decode.
* Waiting: after prefill the policy admits a request (locally or offloaded) or says
  wait; a waiting request's KV stays in its prefill instance's pool and it asks again,
  in arrival order, whenever a request releases capacity.
* The prefill gate (``limits.prefill_when_admissible``, policy/prefill_gate.py): before
  its prefill a request waits, in arrival order, until the policy would admit it to
  decode, those gated through and not yet admitted counted as admitted (``enter_gate``);
  its reservation is taken back just before its real admission (``wait``).
* The ledger: what an attempt counts in the ``ClusterLoad`` the policy reads.
  Invariant: each attempt calls ``placed``, at most once ``enter_gate``, ``prefilled``
  once prefill returns, ``admitted`` at most once, and ``ended`` exactly once; ``ended``
  takes back exactly what the others added (a gate entry's reservation, or its place in
  the gate's queue, included), so an idle cluster's load is all zeros; whatever frees
  capacity wakes the waiters and then pumps the gate.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from adrenaline.actors.cluster import Cluster
from adrenaline.app_config import LimitsConfig
from adrenaline.errors import OverloadedError
from adrenaline.policy import ClusterLoad, Placement, PlacementPolicy
from adrenaline.policy import load as load_moves
from adrenaline.policy.prefill_gate import GateEntry, PrefillGate
from adrenaline.policy.prefix import PrefixIndex
from adrenaline.protocol import GenerateRequest
from adrenaline.serve.attempt import Restart


def new_load(cluster: Cluster) -> ClusterLoad:
    # The router's record of each prefill instance's prefix cache starts empty, like the
    # instances' caches; none when prefix caching is off there.
    caching = all(i.prefix_caching for i in cluster.prefill_info)
    return load_moves.new_cluster_load(
        len(cluster.prefill), [i.num_kv_blocks * i.block_size for i in cluster.decode_info],
        cluster.executor_capacity_tokens,
        [PrefixIndex(i.num_kv_blocks, i.block_size) for i in cluster.prefill_info]
        if caching else None, block_size=cluster.decode_info[0].block_size)


class Admission:
    def __init__(self, limits: LimitsConfig, policy: PlacementPolicy | None = None):
        self.limits = limits
        self._waiters: list[asyncio.Future] = []  # requests waiting for admission, FIFO
        # The prefill gate: only with the option (and a policy to ask).
        self.gate = (PrefillGate(policy) if limits.prefill_when_admissible
                     and policy is not None else None)
        self._pump_due = False  # a gate pump is scheduled after the woken waiters
        # Admission limits: requests held now, and those not yet decoding.
        self.num_ongoing = 0
        self.num_queued = 0
        self.num_refused = 0  # refused at the limits since start

    def refuse_if_overloaded(self) -> None:
        """Raise OverloadedError when one more request would pass the limits (args.limits)."""
        why = self.limits.refusal(self.num_ongoing, self.num_queued)
        if why is None:
            return
        self.num_refused += 1
        raise OverloadedError(f"the server is overloaded: {why}; retry later",
                              retry_after_s=self.limits.retry_after_s)

    def placed(self, load: ClusterLoad, where: Placement, reserved: int,
               prefill_tokens: int = 0) -> None:
        """Pending load is counted at placement, so placements made meanwhile see it.
        ``prefill_tokens``: the prompt tokens the prefill instance is expected to compute."""
        load_moves.placed(load, where, reserved, prefill_tokens)
        self.num_queued += 1

    def prefilled(self, load: ClusterLoad, where: Placement, prefill_tokens: int = 0) -> None:
        load_moves.prefilled(load, where, prefill_tokens)

    def enter_gate(self, req: GenerateRequest, where: Placement, load: ClusterLoad,
                   reserved: int, mean: int) -> GateEntry | None:
        """Queue the request at the prefill gate (None when the gate is off); its
        ``waiter`` (a future) is done once it passed. The entry is the attempt's to hand
        to ``wait`` and ``ended``."""
        if self.gate is None:
            return None
        waiter = asyncio.get_running_loop().create_future()

        def passed(_: GateEntry) -> None:
            if not waiter.done():  # (cancelled: its attempt is going away)
                waiter.set_result(None)

        entry = GateEntry(req, where, load, reserved, mean, on_pass=passed)
        entry.waiter = waiter
        self.gate.enter(entry)
        return entry

    async def wait(self, policy: PlacementPolicy, req: GenerateRequest, where: Placement,
                   load: ClusterLoad, is_current: Callable[[], bool],
                   gate: GateEntry | None = None) -> Placement:
        """Wait until the policy admits the request; waiters retry in arrival order.

        ``gate``: its prefill gate entry, whose reservation is taken back first (the policy
        is asked as without the gate; a refusal then frees that capacity for others).
        Restart when ``is_current`` turns false meanwhile: the attempt was lost (an actor it
        depends on, or its whole cluster, is gone).
        """
        if gate is not None and self.gate is not None and self.gate.take(gate):
            decision = policy.admit(req, where, load)
            if decision is not None:
                return decision
            self.capacity_freed()  # its reservation, unused: others may fit
        while (decision := policy.admit(req, where, load)) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
            if not is_current():
                raise Restart()
        return decision

    def admitted(self, load: ClusterLoad, where: Placement, reserved: int, mean: int,
                 offload: bool) -> None:
        self.num_queued -= 1
        load_moves.admitted(load, Placement(where.prefill, where.decode, offload), reserved,
                            mean)

    def ended(self, load: ClusterLoad, where: Placement, reserved: int, mean: int,
              admitted: bool, offload: bool, gate: GateEntry | None = None) -> None:
        """Take back what the attempt counted (``gate``: its prefill gate entry, wherever it
        got to); capacity freed wakes the waiters."""
        freed = self.gate is not None and gate is not None and self.gate.leave(gate)
        if not admitted:
            self.num_queued -= 1
            load_moves.released(load, where, None, reserved, mean)
        else:
            load_moves.released(load, where, Placement(where.prefill, where.decode, offload),
                                reserved, mean)
            freed = True
        if freed:
            self.capacity_freed()

    def capacity_freed(self) -> None:
        """Wake the admission waiters (parked: they re-ask first), then pump the gate."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.gate is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: nothing is awoken, pump now)
            self.gate.pump()
            return
        if not self._pump_due:
            # After the waiters' wake-ups (scheduled by set_result above): parked requests
            # re-ask before the gate lets more through.
            self._pump_due = True
            loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_due = False
        self.gate.pump()
