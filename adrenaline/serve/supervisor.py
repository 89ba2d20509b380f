"""Supervisor: owns the router's cluster and replaces it when one of its actors dies.

Detection of deaths is through Ray: one ``watch()`` call stays pending on every
actor, and Ray fails it (RayActorError) the moment the actor's process is gone; a
call the router makes to a dead actor fails the same way and reports too.
Detection of hangs is a heartbeat: every actor's ``metrics()`` is asked about
every ``hang_timeout_s / 4`` (at most 1 s); an actor that does not answer within
``recovery.hang_timeout_s``, or that has work and completes no step for that
long, is hung: it is reported like a death, and the replacement kills it
(``ray.kill``: SIGKILL from its node's raylet, which works on a stopped process).

Replacement is whole-cluster: the survivors are killed as well and a new
cluster (new processes, new communicator world, same placement-group
bundles) is started, because a gloo world cannot take a new member and the
survivors' threads may be blocked on the dead peer. Requests then rerun on
the new cluster from their prompt plus the tokens already streamed (the
router's job, see router.py).

States: "up" (``cluster`` serves), "recovering" (callers wait in ``ready()``;
attempts repeat until ``recovery.timeout_s`` has passed since the loss),
"down" (no replacement could be started in that time: ``ready()`` raises
ServiceUnavailableError at once, and a new attempt runs every
``retry_interval_s``). ``generation`` grows by one per lost cluster; work
started on an older generation is stale and must be rerun.
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

log = logging.getLogger(__name__)


def _detached(coro) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class Supervisor:
    def __init__(self, args: AppArgs, name_prefix: str,
                 on_lost: Callable[[], None], on_ready: Callable[[Cluster], None]):
        self.args = args
        self.prefix = name_prefix
        self._names = itertools.count(1)  # actor names must be fresh per start attempt
        self.cluster = Cluster(args, name_prefix=name_prefix)
        self.generation = 0
        self.state = "up"
        self.error: str | None = None
        self.num_recoveries = 0  # clusters replaced since start
        # (role, seconds from its last progress to the report) per hang detected.
        self.hangs: list[tuple[str, float]] = []
        self._on_lost = on_lost  # router: stop pollers, tell streams to rerun
        self._on_ready = on_ready  # router: fresh load accounting for the new cluster
        self._watchers: list[asyncio.Task] = []
        self._changed: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching (needs the event loop; idempotent)."""
        if not self._watchers and self.state == "up":
            gen = self.generation
            workers = self.cluster.named_workers()
            self._watchers = [_detached(self._watch(gen, role, i, actor))
                              for role, i, actor in workers]
            self._watchers += [_detached(self._heartbeat(gen, role, i, actor))
                               for role, i, actor in workers]

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

    async def is_stale(self, gen: int, exc: BaseException | None = None,
                       grace_s: float = 5.0) -> bool:
        """Did the cluster of generation ``gen`` fail (so work on it must be rerun)?

        A call to a dead actor proves it (and is reported here). Any other error from
        an actor may be a symptom of a peer's death (a broken transport) that the
        watchers report a moment later, so wait up to ``grace_s`` for them.
        """
        if self.generation != gen:
            return True
        if isinstance(exc, ray.exceptions.RayActorError):
            self.report(gen, f"an actor died: {type(exc).__name__}")
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.generation == gen and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return self.generation != gen

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
        self._watchers = []
        self._on_lost()
        self._task = _detached(self._replace(reason))

    async def _heartbeat(self, gen: int, role: str, index: int, actor) -> None:
        """Report ``actor`` hung when it stops answering, or has work and makes no progress."""
        loop = asyncio.get_running_loop()
        timeout = self.args.recovery.hang_timeout_s
        steps, progress_at = -1, loop.time()
        while gen == self.generation:
            asked = loop.time()
            try:
                m = await asyncio.wait_for(actor.metrics.remote(), timeout)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                self._hung(gen, role, f"{role} {index} hung (no answer in {timeout:.0f} s)",
                           loop.time() - progress_at)
                return
            except Exception:  # dead: its watcher reports it
                return
            # Work: decode steps running requests, prefill queued prompts, an executor
            # serves its adopted requests' layers (held prefill KV is not work).
            busy = (m.num_waiting if role == "prefill" else m.num_running) > 0
            now = loop.time()
            if not busy or m.num_steps != steps:
                steps, progress_at = m.num_steps, now
            elif now - progress_at > timeout:
                self._hung(gen, role, f"{role} {index} hung (no step in {timeout:.0f} s with "
                                      f"work)", now - progress_at)
                return
            await asyncio.sleep(max(0.0, min(1.0, timeout / 4) - (now - asked)))

    def _hung(self, gen: int, role: str, reason: str, stalled_s: float) -> None:
        if gen == self.generation and self.state == "up":  # not already being replaced
            self.hangs.append((role, stalled_s))
        self.report(gen, reason)

    async def _watch(self, gen: int, role: str, index: int, actor) -> None:
        try:
            await actor.watch.remote()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError: the process is gone
            self.report(gen, f"{role} {index} died ({type(e).__name__})")

    async def _replace(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
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
