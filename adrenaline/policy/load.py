"""The router's ClusterLoad: how it is built and how it moves as a request goes through.

The live router (through serve/admission.py) and the cluster simulator (adrenaline/sim)
both build the load with ``new_cluster_load`` and move it with the transitions below, so
the policies see the same load in both (tests/integration/test_sim_vs_router.py checks
the two decide alike). A request's
path:

    placed ──prefilled──> (admission) ──admitted──> decoding ──released
       └─────────────── released before admission ─┘

With the prefill gate (policy/prefill_gate.py) a request passes the gate before its
prefill: ``gated`` counts it as admitted at the gate's decision (its decode or executor
capacity held while it prefills) and ``ungated``, its exact inverse, takes that back
just before the real admission (or when it ends first).

Invariant: after ``released`` every counter the request touched is back where it was.
"""

from __future__ import annotations

from adrenaline.policy.base import ClusterLoad, Placement
from adrenaline.policy.prefix import PrefixIndex


def new_cluster_load(num_prefill: int, decode_capacity_tokens: list[int],
                     executor_capacity_tokens: list[int],
                     prefill_prefix: list[PrefixIndex] | None = None,
                     block_size: int = 1) -> ClusterLoad:
    """All-idle load of a cluster (executor lists empty when offloading is off;
    ``prefill_prefix``: one empty record per prefill instance, None when prefix caching
    is off there; ``block_size``: the KV block of the decode and executor pools)."""
    n_d, n_e = len(decode_capacity_tokens), len(executor_capacity_tokens)
    prefixes = list(prefill_prefix or [])
    return ClusterLoad(prefill_inflight=[0] * num_prefill, decode_active=[0] * n_d,
                       decode_reserved_tokens=[0] * n_d,
                       decode_capacity_tokens=list(decode_capacity_tokens),
                       decode_pending_tokens=[0] * n_d,
                       executor_active=[0] * n_e, executor_reserved_tokens=[0] * n_e,
                       executor_capacity_tokens=list(executor_capacity_tokens),
                       decode_mean_tokens=[0] * n_d, executor_mean_tokens=[0] * n_e,
                       prefill_prefix=prefixes, block_size=block_size,
                       prefill_queued_tokens=[0] * num_prefill if prefixes else [])


def placed(load: ClusterLoad, where: Placement, reserved: int, prefill_tokens: int = 0) -> None:
    """At placement: one more prefill in flight, ``prefill_tokens`` prompt tokens queued for
    it to compute (its cached prefix excluded); its KV pending on the decode instance."""
    load.prefill_inflight[where.prefill] += 1
    if load.prefill_queued_tokens:
        load.prefill_queued_tokens[where.prefill] += prefill_tokens
    load.decode_pending_tokens[where.decode] += load.footprint(reserved)


def prefilled(load: ClusterLoad, where: Placement, prefill_tokens: int = 0) -> None:
    """Its prefill returned (first token, or an error)."""
    load.prefill_inflight[where.prefill] -= 1
    if load.prefill_queued_tokens:
        load.prefill_queued_tokens[where.prefill] -= prefill_tokens


def admitted(load: ClusterLoad, decision: Placement, reserved: int, mean: int) -> None:
    """The policy admitted it (``decision.offload``: onto the executor beside its prefill);
    ``mean``: its KV averaged over its life (policy/base.py's ``life_mean_tokens``)."""
    d, p = decision.decode, decision.prefill
    reserved = load.footprint(reserved)
    load.decode_pending_tokens[d] -= reserved
    load.decode_active[d] += 1
    if decision.offload:
        load.executor_active[p] += 1
        load.executor_reserved_tokens[p] += reserved
        load.executor_mean_tokens[p] += mean
    else:
        load.decode_reserved_tokens[d] += reserved
        load.decode_mean_tokens[d] += mean


def released(load: ClusterLoad, where: Placement, decision: Placement | None,
             reserved: int, mean: int) -> None:
    """It ended: finished, failed or cancelled; ``decision`` None if never admitted."""
    reserved = load.footprint(reserved)
    if decision is None:
        load.decode_pending_tokens[where.decode] -= reserved
        return
    d, p = decision.decode, decision.prefill
    load.decode_active[d] -= 1
    if decision.offload:
        load.executor_active[p] -= 1
        load.executor_reserved_tokens[p] -= reserved
        load.executor_mean_tokens[p] -= mean
    else:
        load.decode_reserved_tokens[d] -= reserved
        load.decode_mean_tokens[d] -= mean


def gated(load: ClusterLoad, decision: Placement, reserved: int, mean: int) -> None:
    """It passed the prefill gate at ``decision``: counted as admitted there (moved from
    pending), so the gate and the policy see its capacity taken while it prefills."""
    admitted(load, decision, reserved, mean)


def ungated(load: ClusterLoad, decision: Placement, reserved: int, mean: int) -> None:
    """The exact inverse of ``gated``: back to pending (before its real admission, or
    before ``released`` when it ends never admitted)."""
    released(load, decision, decision, reserved, mean)
    load.decode_pending_tokens[decision.decode] += load.footprint(reserved)
