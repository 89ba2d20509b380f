"""Admission at the router: the limits, the wait for decode capacity, the load ledger.

* Limits (``AppArgs.limits``): beyond them a request is refused at once
  (``OverloadedError`` -> HTTP 429). ``num_ongoing`` counts the generation requests the
  router holds, ``num_queued`` those placed but not yet admitted to decode.
* Waiting: after prefill the policy admits a request (locally or offloaded) or says
  wait; a waiting request's KV stays in its prefill instance's pool and it asks again,
  in arrival order, whenever a request releases capacity.
* The ledger: what an attempt counts in the ``ClusterLoad`` the policy reads.
  Invariant: each attempt calls ``placed``, ``prefilled`` once prefill returns,
  ``admitted`` at most once, and ``ended`` exactly once; ``ended`` takes back exactly
  what the others added, so an idle cluster's load is all zeros.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from adrenaline.actors.cluster import Cluster
from adrenaline.app_config import LimitsConfig
from adrenaline.errors import OverloadedError
from adrenaline.policy import ClusterLoad, Placement, PlacementPolicy
from adrenaline.policy import load as load_moves
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
    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self._waiters: list[asyncio.Future] = []  # requests waiting for admission, FIFO
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

    async def wait(self, policy: PlacementPolicy, req: GenerateRequest, where: Placement,
                   load: ClusterLoad, is_current: Callable[[], bool]) -> Placement:
        """Wait until the policy admits the request; waiters retry in arrival order.

        Restart when ``is_current`` turns false meanwhile: the attempt was lost (an actor it
        depends on, or its whole cluster, is gone).
        """
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
              admitted: bool, offload: bool) -> None:
        """Take back what the attempt counted; capacity freed wakes the waiters."""
        if not admitted:
            self.num_queued -= 1
            load_moves.released(load, where, None, reserved, mean)
        else:
            load_moves.released(load, where, Placement(where.prefill, where.decode, offload),
                                reserved, mean)
            self.capacity_freed()

    def capacity_freed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
