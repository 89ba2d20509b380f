"""Cluster: creates the prefill, decode and attention-executor actors and wires their world.

Ranks: prefill instance i is rank i, decode instance j is rank P + j, and the
attention executor of prefill instance i (when enabled) is rank P + D + i, in
one world per cluster. A prefill worker and its executor share one
placement-group bundle (same node, same device). Each actor is an asyncio
actor; the cluster only creates and connects them (the router routes).

A cluster is replaced as a whole when one of its actors dies (see
serve/supervisor.py): a gloo world cannot take a new member, so the
replacement is a new world. The placement groups outlive the actors: the
replacement's prefill worker and executor go into the same bundle.
"""

from __future__ import annotations

import ray

from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from adrenaline.actors.attention_executor import AttentionExecutor
from adrenaline.actors.decode import DecodeWorker
from adrenaline.actors.prefill import PrefillWorker
from adrenaline.protocol import WorkerInfo
from adrenaline.app_config import AppArgs


def _actor(cls, name: str, num_cpus: float, num_gpus: float, resources: dict | None = None,
           **options):
    return ray.remote(cls).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                                   resources=dict(resources or {}), max_concurrency=1000,
                                   max_restarts=0, **options)


# Ray needs some resource in a bundle; a sliver of CPU per actor makes co-placement explicit.
_SLIVER = 0.01


class Cluster:
    """``groups``: placement groups of a cluster being replaced, to reuse (one per prefill
    instance). ``timeout_s``: bound on start-up; past it (e.g. no resources for a
    replacement) the actors created so far are killed and GetTimeoutError is raised.
    """

    def __init__(self, args: AppArgs, name_prefix: str = "adrenaline",
                 groups: list | None = None, timeout_s: float | None = None):
        self.args = args
        self.groups = list(groups or [])
        self.prefill, self.executors, self.decode = [], [], []
        try:
            for i in range(args.prefill.num_instances):
                self._create_prefill(args, i, name_prefix, timeout_s)
            d = args.decode
            self.decode = [_actor(DecodeWorker, f"{name_prefix}-decode-{j}", d.num_cpus,
                                  d.num_gpus, d.resources).remote(args, j)
                           for j in range(d.num_instances)]
            self.prefill_info: list[WorkerInfo] = ray.get(
                [a.info.remote() for a in self.prefill], timeout=timeout_s)
            self.decode_info: list[WorkerInfo] = ray.get(
                [a.info.remote() for a in self.decode], timeout=timeout_s)
            self.executor_capacity_tokens: list[int] = ray.get(
                [e.capacity_tokens.remote() for e in self.executors], timeout=timeout_s)
            self._connect(timeout_s)
        except BaseException:
            self.shutdown(keep_groups=groups is not None)
            raise

    def named_workers(self) -> list[tuple[str, int, object]]:
        """(role, index, actor) of every actor."""
        return ([("prefill", i, a) for i, a in enumerate(self.prefill)]
                + [("decode", j, a) for j, a in enumerate(self.decode)]
                + [("executor", i, a) for i, a in enumerate(self.executors)])

    def _create_prefill(self, args: AppArgs, i: int, prefix: str,
                        timeout_s: float | None) -> None:
        role = args.prefill
        if not args.executor.enabled:
            self.prefill.append(_actor(PrefillWorker, f"{prefix}-prefill-{i}", role.num_cpus,
                                       role.num_gpus, role.resources).remote(args, i))
            return
        # One bundle for the pair: the executor shares the prefill instance's device.
        if i < len(self.groups):  # a replacement: the same bundle as before
            pg = self.groups[i]
        else:
            bundle = {"CPU": role.num_cpus + 2 * _SLIVER}
            if role.num_gpus:
                bundle["GPU"] = role.num_gpus
            bundle.update(role.resources)  # the node kind the pair must land on
            pg = placement_group([bundle], strategy="STRICT_PACK")
            self.groups.append(pg)
        ray.get(pg.ready(), timeout=timeout_s)
        where = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
        half_gpu = role.num_gpus / 2
        self.prefill.append(_actor(PrefillWorker, f"{prefix}-prefill-{i}", role.num_cpus + _SLIVER,
                                   half_gpu, role.resources,
                                   scheduling_strategy=where).remote(args, i))
        self.executors.append(_actor(AttentionExecutor, f"{prefix}-executor-{i}", _SLIVER, half_gpu,
                                     scheduling_strategy=where).remote(args, i))

    @property
    def workers(self) -> list:
        return self.prefill + self.decode + self.executors

    def prefill_rank(self, i: int) -> int:
        return i

    def decode_rank(self, j: int) -> int:
        return len(self.prefill) + j

    def executor_rank(self, i: int) -> int:
        return len(self.prefill) + len(self.decode) + i

    def _connect(self, timeout_s: float | None = None) -> None:
        kind = self.args.transport
        if kind == "auto":
            kind = "nccl" if self.args.device == "cuda" else "gloo"
        if kind == "nccl":
            from adrenaline.transport.nccl import new_nccl_unique_id

            init = new_nccl_unique_id()
        else:
            # Rank 0 (prefill 0) serves the rendezvous store: its node's address, a port
            # free there (the router may run on another node).
            init = ray.get(self.prefill[0].rendezvous_address.remote(), timeout=timeout_s)
        world = len(self.workers)
        executor_ranks = [self.executor_rank(i) for i in range(len(self.executors))]
        decode_ranks = [self.decode_rank(j) for j in range(len(self.decode))]
        calls = [w.connect.remote(kind, self.prefill_rank(i), world, init)
                 for i, w in enumerate(self.prefill)]
        calls += [w.connect.remote(kind, self.decode_rank(j), world, init, executor_ranks)
                  for j, w in enumerate(self.decode)]
        calls += [w.connect.remote(kind, self.executor_rank(i), world, init, decode_ranks)
                  for i, w in enumerate(self.executors)]
        ray.get(calls, timeout=timeout_s)

    def shutdown(self, keep_groups: bool = False) -> None:
        """Kill every actor (no restart); ``keep_groups`` keeps the bundles for a replacement."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        if not keep_groups:
            for pg in self.groups:
                remove_placement_group(pg)
