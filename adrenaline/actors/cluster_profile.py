"""The start-up profile of a running cluster (policy/profile.py's numbers), measured live.

Run by the router once the cluster is linked, only for a policy that declares
it needs the profile (``PlacementPolicy.needs_profile``). It leaves every pool as
it found it. Measured:

- decode instance 0: the step's base time at batches up to its ``max_num_seqs``
  and its attention seconds per KV token (engine/step_profile.py);
- each decode instance's attention rate, and each executor's, by running attention;
- the exchange: a decode step with one short offloaded request on executor 0,
  what the step waits beyond the attention.

Each figure is the least of ``PROFILE_ROUNDS`` rounds timed one after another. Start-up
is when Ray's own processes are busiest, and other work on a role's core inflates what
one round measures: in one run here a single round read base steps and attention
1.4x what the served steps then paid, and load_aware offloaded half as much.
"""

from __future__ import annotations

import logging

import ray

from adrenaline.policy.profile import ClusterProfile, profile_batches

log = logging.getLogger(__name__)

EXCHANGE_CONTEXT = 16  # tokens of the request the exchange is timed with
PROFILE_ROUNDS = 3


def profile_cluster(cluster, args, timeout_s: float = 600.0,
                    rounds: int = PROFILE_ROUNDS) -> ClusterProfile:
    measured = [_measure(cluster, args, timeout_s) for _ in range(rounds)]
    bases, decode_attn, exe_attn, exchanges = zip(*measured)
    kv_bytes = ray.get(cluster.decode[0].kv_bytes_per_token.remote(), timeout=timeout_s)
    profile = ClusterProfile(
        base_step_s={b: min(base[b] for base in bases)
                     for b in sorted(set.intersection(*(set(base) for base in bases)))},
        decode_attn_s_per_token=[min(r) for r in zip(*decode_attn)],
        executor_attn_s_per_token=[min(r) for r in zip(*exe_attn)], exchange_s=min(exchanges),
        decode_capacity_tokens=[i.num_kv_blocks * i.block_size for i in cluster.decode_info],
        executor_capacity_tokens=list(cluster.executor_capacity_tokens),
        kv_bytes_per_token=kv_bytes)
    log.info("start-up profile (least of %d rounds): %s", rounds, profile.summary())
    return profile


def _measure(cluster, args, timeout_s: float
             ) -> tuple[dict[int, float], list[float], list[float], float]:
    """One round: (base step seconds by batch, decode attention per KV token per decode
    instance, the same per executor, exchange seconds)."""
    decode, executors = cluster.decode, cluster.executors
    batches = profile_batches(args.decode.engine.max_num_seqs)
    base, attn0 = ray.get(decode[0].profile_steps.remote(batches), timeout=timeout_s)
    others = ray.get([d.profile_steps.remote([1]) for d in decode[1:]], timeout=timeout_s)
    exe_attn = ray.get([e.profile_attention.remote() for e in executors], timeout=timeout_s)
    exchange = 0.0
    if executors:
        handle = ray.get(executors[0].adopt_synthetic.remote(EXCHANGE_CONTEXT), timeout=timeout_s)
        try:
            exchange = ray.get(decode[0].profile_exchange.remote(0, handle, EXCHANGE_CONTEXT),
                               timeout=timeout_s)
        finally:
            ray.get(executors[0].free.remote(handle), timeout=timeout_s)
    return ({int(b): t for b, t in base.items()}, [attn0] + [a for _, a in others],
            list(exe_attn), exchange)
