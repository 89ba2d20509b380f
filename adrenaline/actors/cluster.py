"""Cluster: creates the prefill, decode and attention-executor actors and wires their world.

Ranks: prefill instance i is rank i, decode instance j is rank P + j, and the
attention executor of prefill instance i (when enabled) is rank P + D + i.
A prefill worker and its executor share one placement-group bundle (same
node, same device). Each actor is an asyncio
actor; the cluster only creates and connects them (the router routes).

Tensors move over *links*, one two-rank world per pair of actors that
exchange them (prefill i <-> decode j for KV handoffs, decode j <-> executor
i for offloaded attention), addressed by the global ranks above (see
transport/mesh.py). Each link's kind is chosen for its pair (``link_kind``):
with ``transport: auto``, shared memory when both actors are on one Ray
node, gloo across nodes, NCCL between GPUs. When one actor is lost, ``replace`` starts a new one in
its slot and links it with each peer; the survivors keep their links, their
KV and their work (serve/supervisor.py). Each slot has an *epoch* (times
replaced): a link is recorded under its peer's epoch, so work meant for one
incarnation of an actor never reaches the next. The placement groups outlive
the actors: a replacement prefill worker or executor goes into the same
bundle. When several actors are lost at once the whole cluster is replaced.
"""

from __future__ import annotations

import asyncio

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
        self._ready_groups: set[int] = set()  # indexes of groups known ready
        self.prefill, self.executors, self.decode = [], [], []
        self.epochs: dict[tuple[str, int], int] = {}  # (role, index) -> replacements so far
        self.nodes: dict[tuple[str, int], str] = {}  # (role, index) -> the Ray node it runs on
        # The kind of each link, keyed by its two slots in sorted order.
        self.link_kinds: dict[tuple[tuple[str, int], tuple[str, int]], str] = {}
        try:
            for i in range(args.prefill.num_instances):
                self.prefill.append(self._spawn("prefill", i, f"{name_prefix}-prefill-{i}",
                                                timeout_s))
                if args.executor.enabled:
                    self.executors.append(self._spawn("executor", i,
                                                      f"{name_prefix}-executor-{i}", timeout_s))
            self.decode = [self._spawn("decode", j, f"{name_prefix}-decode-{j}")
                           for j in range(args.decode.num_instances)]
            self.prefill_info: list[WorkerInfo] = ray.get(
                [a.info.remote() for a in self.prefill], timeout=timeout_s)
            self.decode_info: list[WorkerInfo] = ray.get(
                [a.info.remote() for a in self.decode], timeout=timeout_s)
            self.executor_capacity_tokens: list[int] = ray.get(
                [e.capacity_tokens.remote() for e in self.executors], timeout=timeout_s)
            slots = self.named_workers()
            self.nodes = dict(zip([(role, i) for role, i, _ in slots], ray.get(
                [a.node_id.remote() for _, _, a in slots], timeout=timeout_s)))
            self._connect(timeout_s)
        except BaseException:
            self.shutdown(keep_groups=groups is not None)
            raise

    def slots(self) -> list[tuple[str, int]]:
        return [(role, i) for role, i, _ in self.named_workers()]

    def named_workers(self) -> list[tuple[str, int, object]]:
        """(role, index, actor) of every actor."""
        return ([("prefill", i, a) for i, a in enumerate(self.prefill)]
                + [("decode", j, a) for j, a in enumerate(self.decode)]
                + [("executor", i, a) for i, a in enumerate(self.executors)])

    def _spawn(self, role: str, i: int, name: str, timeout_s: float | None = None):
        """A new actor for slot (role, i), at start and on replacement alike. With
        executors, a prefill worker and its executor share one placement-group bundle
        (same node, same device: half its GPU each); a replacement goes into the bundle
        of the actor it replaces."""
        args = self.args
        if role == "decode":
            d = args.decode
            return _actor(DecodeWorker, name, d.num_cpus, d.num_gpus, d.resources).remote(args, i)
        r = args.prefill
        if not args.executor.enabled:  # a prefill worker without a bundle
            return _actor(PrefillWorker, name, r.num_cpus, r.num_gpus, r.resources).remote(args, i)
        where = PlacementGroupSchedulingStrategy(placement_group=self._bundle(i, timeout_s),
                                                 placement_group_bundle_index=0)
        if role == "prefill":
            return _actor(PrefillWorker, name, r.num_cpus + _SLIVER, r.num_gpus / 2,
                          r.resources, scheduling_strategy=where).remote(args, i)
        return _actor(AttentionExecutor, name, _SLIVER, r.num_gpus / 2,
                      scheduling_strategy=where).remote(args, i)

    def _bundle(self, i: int, timeout_s: float | None):
        """Prefill instance i's bundle: made (and waited for) at its cluster's start, or
        kept from the cluster it replaces; a replaced actor's is there already."""
        if i < len(self.groups):
            pg = self.groups[i]
            if i in self._ready_groups:
                return pg
        else:
            r = self.args.prefill
            bundle = {"CPU": r.num_cpus + 2 * _SLIVER}
            if r.num_gpus:
                bundle["GPU"] = r.num_gpus
            bundle.update(r.resources)  # the node kind the pair must land on
            pg = placement_group([bundle], strategy="STRICT_PACK")
            self.groups.append(pg)
        ray.get(pg.ready(), timeout=timeout_s)
        self._ready_groups.add(i)
        return pg

    @property
    def workers(self) -> list:
        return self.prefill + self.decode + self.executors

    def prefill_rank(self, i: int) -> int:
        return i

    def decode_rank(self, j: int) -> int:
        return len(self.prefill) + j

    def executor_rank(self, i: int) -> int:
        return len(self.prefill) + len(self.decode) + i

    def rank_of(self, role: str, i: int) -> int:
        return {"prefill": self.prefill_rank, "decode": self.decode_rank,
                "executor": self.executor_rank}[role](i)

    def actor(self, role: str, i: int):
        return {"prefill": self.prefill, "decode": self.decode, "executor": self.executors}[role][i]

    def epoch(self, role: str, i: int) -> int:
        """How many times the actor in this slot was replaced (0: the first one)."""
        return self.epochs.get((role, i), 0)

    def peers_of(self, role: str, i: int) -> list[tuple[str, int]]:
        """The slots linked with (role, i): prefill<->decode, decode<->executor."""
        if role == "decode":
            return ([("prefill", k) for k in range(len(self.prefill))]
                    + [("executor", k) for k in range(len(self.executors))])
        return [("decode", k) for k in range(len(self.decode))]

    def link_kind(self, a: tuple[str, int], b: tuple[str, int]) -> str:
        """The transport of the link between slots a and b (see the module notes)."""
        kind = self.args.transport
        if kind != "auto":
            return kind
        if self.args.device == "cuda":
            return "nccl"
        return "shm" if self.nodes[a] == self.nodes[b] else "gloo"

    def _set_rank_call(self, role: str, i: int, actor):
        world = len(self.workers)
        if role == "decode":
            ranks = [self.executor_rank(k) for k in range(len(self.executors))]
            return actor.set_rank.remote(self.decode_rank(i), world, ranks)
        return actor.set_rank.remote(self.rank_of(role, i), world)

    def _init_for(self, kind: str, host):
        """A link's rendezvous: an NCCL unique id, or (a ref to) the address the host side
        serves (a gloo store, an shm segment) on its node (the router may run elsewhere)."""
        if kind == "nccl":
            from adrenaline.transport.nccl import new_nccl_unique_id

            return new_nccl_unique_id()
        return host.rendezvous_address.remote(kind)

    def _link_calls(self, a: tuple[str, int], actor_a, b: tuple[str, int], actor_b,
                    init: str) -> list:
        """The two calls that make the two-rank world between slots a and b (a serves the
        rendezvous ``init``); each side records the link under the *other* side's epoch."""
        kind = self.link_kinds[tuple(sorted((a, b)))]
        return [actor_a.link.remote(kind, self.rank_of(*b), init, True, self.epoch(*b)),
                actor_b.link.remote(kind, self.rank_of(*a), init, False, self.epoch(*a))]

    def _pairs(self, slot: tuple[str, int] | None = None) -> list:
        """The pairs of slots that exchange tensors (those of ``slot`` only, with it first),
        their link kinds recorded."""
        if slot is None:
            pairs = [(("prefill", i), ("decode", j)) for i in range(len(self.prefill))
                     for j in range(len(self.decode))]
            pairs += [(("decode", j), ("executor", i)) for j in range(len(self.decode))
                      for i in range(len(self.executors))]
        else:
            pairs = [(slot, peer) for peer in self.peers_of(*slot)]
        for a, b in pairs:
            self.link_kinds[tuple(sorted((a, b)))] = self.link_kind(a, b)
        return pairs

    def _connect(self, timeout_s: float | None = None) -> None:
        """Give every actor its rank and link every pair that exchanges tensors (the first
        slot of each pair serves its rendezvous, on its node)."""
        ray.get([self._set_rank_call(role, i, a) for role, i, a in self.named_workers()],
                timeout=timeout_s)
        pairs = self._pairs()
        inits = [self._init_for(self.link_kinds[tuple(sorted((a, b)))], self.actor(*a))
                 for a, b in pairs]
        inits = [i if isinstance(i, str) else ray.get(i, timeout=timeout_s) for i in inits]
        ray.get([c for (a, b), init in zip(pairs, inits)
                 for c in self._link_calls(a, self.actor(*a), b, self.actor(*b), init)],
                timeout=timeout_s)

    async def replace(self, role: str, i: int, name: str, timeout_s: float) -> None:
        """Replace the actor in slot (role, i) alone: a new actor, linked with every peer.

        The dead (or hung) actor is killed first; a prefill worker or executor goes into
        its old placement-group bundle. The slot's epoch grows by one before the new
        actor links, so peers tell its links from the old one's. On any failure or
        cancellation the new actor is killed and the slot keeps the old (dead) handle.
        """
        old = self.actor(role, i)
        try:
            ray.kill(old, no_restart=True)
        except Exception:  # already gone
            pass
        new = self._spawn(role, i, name)
        try:
            await asyncio.wait_for(self._start_replacement(role, i, new), timeout_s)
        except BaseException:
            try:
                ray.kill(new, no_restart=True)
            except Exception:
                pass
            raise

    async def _start_replacement(self, role: str, i: int, new) -> None:
        await new.info.remote() if role != "executor" else await new.capacity_tokens.remote()
        self.nodes[(role, i)] = await new.node_id.remote()
        self.epochs[(role, i)] = self.epoch(role, i) + 1
        await self._set_rank_call(role, i, new)
        # The new actor serves each link's rendezvous: it is alive and has no other work.
        pairs = self._pairs((role, i))
        inits = [self._init_for(self.link_kinds[tuple(sorted(p))], new) for p in pairs]
        inits = [i if isinstance(i, str) else await i for i in inits]
        await asyncio.gather(*[c for (a, b), init in zip(pairs, inits)
                               for c in self._link_calls(a, new, b, self.actor(*b), init)])
        {"prefill": self.prefill, "decode": self.decode, "executor": self.executors}[role][i] = new

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
