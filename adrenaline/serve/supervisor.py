"""Supervisor: owns the router's cluster and replaces it when one of its actors dies.

Detection of deaths is through Ray: one ``watch()`` call stays pending on every
actor, and Ray fails it (RayActorError) the moment the actor's process is gone; a
call the router makes to a dead actor fails the same way and reports too.
Detection of hangs is a heartbeat: every actor's ``metrics()`` is asked about
every ``hang_timeout_s / 4`` (at most 1 s); an actor that does not answer within
``recovery.hang_timeout_s``, a prefill or decode worker that has work and
completes no step for that long, or an executor that keeps a decode step
waiting for its output that long, is hung: it is reported like a death, and
the replacement kills it (``ray.kill``: SIGKILL from its node's raylet, which
works on a stopped process).

Replacement is of the lost actor alone (``recovery.partial``, the default):
a new actor in its slot (the same placement-group bundle), linked with each
of its peers (actors/cluster.py ``replace``); the survivors keep their links,
their KV and their work. The router reruns only the requests that depended
on the lost actor (``on_actor_lost``); new requests that need the slot wait
for it (``wait_slots``). While one slot is being replaced no peer counts as
hung (they may be waiting for it). A second loss during a replacement, a
replacement that cannot be started in time, or ``partial: false`` replace
the whole cluster instead: the survivors are killed as well and a new
cluster (new processes, new links, same bundles) is started, and every
request in flight reruns from its prompt plus the tokens already streamed
(the router's job, see router.py).

States: "up" (``cluster`` serves), "recovering" (callers wait in ``ready()``;
attempts repeat until ``recovery.timeout_s`` has passed since the loss),
"down" (no replacement could be started in that time: ``ready()`` raises
ServiceUnavailableError at once, and a new attempt runs every
``retry_interval_s``). ``generation`` grows by one per lost cluster; work
started on an older generation is stale and must be rerun. Within a
generation, each slot's epoch (``Cluster.epoch``) grows by one per actor
replaced there.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import Callable

import ray.exceptions

from adrenaline.actors.cluster import Cluster
from adrenaline.errors import ServiceUnavailableError
from adrenaline.app_config import AppArgs
from adrenaline.protocol import WorkerMetrics

log = logging.getLogger(__name__)


def _detached(coro) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class Supervisor:
    def __init__(self, args: AppArgs, name_prefix: str,
                 on_lost: Callable[[], None], on_ready: Callable[[Cluster], None],
                 on_actor_lost: Callable[[str, int], None] = lambda role, i: None,
                 on_actor_ready: Callable[[str, int], None] = lambda role, i: None,
                 on_metrics: Callable[[str, int, WorkerMetrics], None] = lambda role, i, m: None):
        self.args = args
        self.prefix = name_prefix
        self._names = itertools.count(1)  # actor names must be fresh per start attempt
        self.cluster = Cluster(args, name_prefix=name_prefix)
        self.generation = 0
        self.state = "up"
        self.error: str | None = None
        self.num_recoveries = 0  # recoveries since start (an actor or the whole cluster)
        self.num_cluster_replacements = 0  # of which the whole cluster was replaced
        self.num_losses = 0  # losses detected (an actor, or several at once)
        # (role, seconds from its last progress to the report) per hang detected.
        self.hangs: list[tuple[str, float]] = []
        self._on_lost = on_lost  # router: stop pollers, tell streams to rerun
        self._on_ready = on_ready  # router: fresh load accounting for the new cluster
        self._on_actor_lost = on_actor_lost  # router: rerun what depended on that actor
        self._on_actor_ready = on_actor_ready  # router: the slot serves again
        self._on_metrics = on_metrics  # router: each heartbeat's metrics (the policy's feedback)
        # Slots (role, index) whose actor is being replaced, with the task doing it.
        self._replacing: dict[tuple[str, int], asyncio.Task] = {}
        # Watch and heartbeat tasks per slot (cancelled when the slot's actor is lost).
        self._slot_watchers: dict[tuple[str, int], list[asyncio.Task]] = {}
        self._watchers: list[asyncio.Task] = []
        self._changed: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching (needs the event loop; idempotent)."""
        if not self._watchers and self.state == "up":
            for role, i, actor in self.cluster.named_workers():
                self._watch_slot(role, i, actor)

    def _watch_slot(self, role: str, i: int, actor) -> None:
        gen, epoch = self.generation, self.cluster.epoch(role, i)
        tasks = [_detached(self._watch(gen, role, i, epoch, actor)),
                 _detached(self._heartbeat(gen, role, i, epoch, actor))]
        self._slot_watchers[(role, i)] = tasks
        self._watchers = [t for t in self._watchers if not t.done()] + tasks

    def is_current(self, role: str, i: int, epoch: int) -> bool:
        """Is the actor of that slot and epoch still serving (not lost, not replaced)?"""
        return (self.state == "up" and (role, i) not in self._replacing
                and self.cluster.epoch(role, i) == epoch)

    async def settled(self) -> None:
        """Return once a cluster serves with every slot filled (no replacement under way)."""
        await self.wait_slots(self.cluster.slots())

    async def wait_slots(self, slots) -> None:
        """Return once none of ``slots`` is being replaced (and a cluster serves)."""
        await self.ready()
        while any(slot in self._replacing for slot in slots):
            fut = asyncio.get_running_loop().create_future()
            self._changed.append(fut)
            await fut
            await self.ready()

    def raise_if_down(self) -> None:
        if self.state == "down":
            raise ServiceUnavailableError(self.error or "the cluster is down")

    async def ready(self) -> None:
        """Return once a cluster serves; raise ServiceUnavailableError if none can be started."""
        while self.state == "recovering":
            fut = asyncio.get_running_loop().create_future()
            self._changed.append(fut)
            await fut
        self.raise_if_down()

    def report(self, gen: int, reason: str) -> None:
        """An actor of generation ``gen`` is gone: replace the cluster (once per generation)."""
        if gen != self.generation or self.state != "up":
            return
        if not self.args.recovery.enabled:
            self._set_state("down", f"{reason}; recovery is disabled")
            self.generation += 1
            self._on_lost()
            return
        log.error("cluster generation %d lost (%s): replacing it", gen, reason)
        self.generation += 1
        self._set_state("recovering", None)
        for w in self._watchers:
            w.cancel()
        self._watchers, self._slot_watchers = [], {}
        partial = list(self._replacing.values())
        self._replacing = {}
        for t in partial:
            t.cancel()  # each kills the actor it was starting
        self._on_lost()
        self._task = _detached(self._replace(reason, partial))

    def report_actor(self, gen: int, role: str, i: int, epoch: int, reason: str) -> None:
        """The actor in slot (role, i), of that epoch, is dead or hung: replace it alone
        when it is the only one lost (else the whole cluster, see the module docstring)."""
        if gen != self.generation or self.state != "up":
            return
        slot = (role, i)
        if self.cluster.epoch(role, i) != epoch or slot in self._replacing:
            return  # that incarnation is already being (or was) replaced
        self.num_losses += 1
        if not (self.args.recovery.enabled and self.args.recovery.partial) or self._replacing:
            self.report(gen, reason)
            return
        log.error("%s (generation %d): replacing that actor", reason, gen)
        for w in self._slot_watchers.pop(slot, []):
            w.cancel()
        self._replacing[slot] = _detached(self._replace_actor(gen, role, i, reason))
        self._on_actor_lost(role, i)

    async def _heartbeat(self, gen: int, role: str, index: int, epoch: int, actor) -> None:
        """Report ``actor`` hung when it stops answering, or has work and makes no progress."""
        loop = asyncio.get_running_loop()
        timeout = self.args.recovery.hang_timeout_s
        steps, progress_at = -1, loop.time()
        answered_at = loop.time()
        while gen == self.generation:
            asked = loop.time()
            try:
                m = await asyncio.wait_for(actor.metrics.remote(), timeout)
            except asyncio.CancelledError:
                raise
            except ray.exceptions.ActorDiedError:  # dead: its watcher reports it
                return
            except Exception as e:  # no answer in time, or "unavailable": not yet a hang
                if loop.time() - answered_at > timeout:
                    self._hung(gen, role, index, epoch, f"{role} {index} hung (no answer in "
                                                        f"{timeout:.0f} s: {type(e).__name__})",
                               loop.time() - progress_at)
                    return
                await asyncio.sleep(min(1.0, timeout / 4))
                continue
            answered_at = loop.time()
            self._on_metrics(role, index, m)
            # Work: a decode worker steps its running requests, a prefill worker its queued
            # prompts. A decode worker blocked on an executor's output is not stalled
            # itself; that executor is, once it has kept it waiting past the deadline. An
            # executor only answers its decode workers' steps: it has no work of its own
            # to stall on (a hung one is found by not answering, or by a blocked decode).
            waiting_on = m.waiting_on_executor if role == "decode" else -1
            if role == "executor":
                busy = False
            else:
                busy = (m.num_waiting if role == "prefill" else m.num_running) > 0 \
                    and waiting_on < 0
            now = loop.time()
            if waiting_on >= 0 and m.waiting_s > timeout and not self._replacing:
                self._hung(gen, "executor", waiting_on, self.cluster.epoch("executor", waiting_on),
                           f"executor {waiting_on} hung (decode {index} waited {m.waiting_s:.0f}"
                           f" s for its output)", m.waiting_s)
            # While a slot is replaced its peers may wait for it: not a hang.
            if not busy or m.num_steps != steps or self._replacing:
                steps, progress_at = m.num_steps, now
            elif now - progress_at > timeout:
                self._hung(gen, role, index, epoch, f"{role} {index} hung (no step in "
                                                    f"{timeout:.0f} s with work)",
                           now - progress_at)
                return
            await asyncio.sleep(max(0.0, min(1.0, timeout / 4) - (now - asked)))

    def _hung(self, gen: int, role: str, index: int, epoch: int, reason: str,
              stalled_s: float) -> None:
        if self.is_current(role, index, epoch) and gen == self.generation:
            self.hangs.append((role, stalled_s))  # not already being replaced
        self.report_actor(gen, role, index, epoch, reason)

    async def _watch(self, gen: int, role: str, index: int, epoch: int, actor) -> None:
        try:
            await actor.watch.remote()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError: the process is gone
            self.report_actor(gen, role, index, epoch, f"{role} {index} died ({type(e).__name__})")

    async def _replace_actor(self, gen: int, role: str, i: int, reason: str) -> None:
        """Replace one lost actor (its slot is in ``_replacing`` meanwhile)."""
        loop = asyncio.get_running_loop()
        cfg = self.args.recovery
        started = loop.time()
        deadline = started + cfg.timeout_s
        while True:
            name = f"{self.prefix}-r{next(self._names)}-{role}-{i}"
            try:
                await self.cluster.replace(role, i, name, max(deadline - loop.time(), 1.0))
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if loop.time() < deadline - 1.0:
                    log.warning("replacement of %s %d failed, retrying: %s", role, i, e)
                    await asyncio.sleep(0.5)
                    continue
                log.error("%s %d could not be replaced (%s): replacing the whole cluster",
                          role, i, e)
                self._replacing.pop((role, i), None)
                self.report(gen, f"{reason}; no replacement for it: {type(e).__name__}: {e}")
                return
        self._replacing.pop((role, i), None)
        self.num_recoveries += 1
        self._watch_slot(role, i, self.cluster.actor(role, i))
        self._on_actor_ready(role, i)
        self._set_state("up", None)  # wakes wait_slots
        log.warning("%s %d replaced (epoch %d) in %.1f s", role, i, self.cluster.epoch(role, i),
                    loop.time() - started)

    async def _replace(self, reason: str, partial: list[asyncio.Task] = ()) -> None:
        loop = asyncio.get_running_loop()
        # Replacements of single actors end first: each kills the actor it was starting.
        await asyncio.gather(*partial, return_exceptions=True)
        old = self.cluster
        await loop.run_in_executor(None, lambda: old.shutdown(keep_groups=True))
        cfg = self.args.recovery
        deadline = loop.time() + cfg.timeout_s  # callers wait until then, then get 503
        while True:
            prefix = f"{self.prefix}-r{next(self._names)}"
            # Attempts while recovering share the deadline; once down, each gets timeout_s.
            bound = (max(deadline - loop.time(), 1.0) if self.state == "recovering"
                     else cfg.timeout_s)
            try:
                cluster = await loop.run_in_executor(None, lambda: Cluster(
                    self.args, name_prefix=prefix, groups=old.groups, timeout_s=bound))
                break
            except Exception as e:
                if self.state == "recovering" and loop.time() < deadline - 1.0:
                    # A quick failure, e.g. a new actor placed on a node that was dying
                    # but not yet known dead: try again, callers keep waiting.
                    log.warning("replacement attempt failed, retrying: %s", e)
                    await asyncio.sleep(0.5)
                    continue
                log.error("no replacement cluster could be started: %s", e)
                self._set_state("down", f"a worker failed ({reason}) and no replacement could "
                                        f"be started: {type(e).__name__}: {e}")
                await asyncio.sleep(cfg.retry_interval_s)
        self.cluster = cluster
        self.num_recoveries += 1
        self.num_cluster_replacements += 1
        self._on_ready(cluster)
        self._set_state("up", None)
        self.start()
        log.warning("cluster replaced (generation %d)", self.generation)

    def _set_state(self, state: str, error: str | None) -> None:
        self.state, self.error = state, error
        changed, self._changed = self._changed, []
        for fut in changed:
            if not fut.done():
                fut.set_result(None)
