"""One attempt: one try of a request through the cluster, from placement to its last token.

An attempt is always in one ``Stage``; each transition is one method here, and what the
attempt holds on the actors (and counts in the load ledger) follows from its stage alone:

    WAITING ─prefilling()─> PREFILLING ─parked()─> PARKED ─admitted()─> DECODING_LOCAL
                               │                                    └─> DECODING_OFFLOADED
                               └─done() (finished at its first token)        │ done()
                                                                             v
    any live stage ─lose()─> LOST (an actor it depended on was lost)        DONE

A client that goes away leaves the attempt in the stage it reached; ``cleanup`` frees it
by that stage. The simulator's requests (sim/router.py) move through the same stages.
Control events (``Control``) travel in the attempt's queue beside the token deltas.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from dataclasses import dataclass, field
from typing import Callable

from adrenaline.policy import ClusterLoad, Placement

log = logging.getLogger(__name__)


class Stage(enum.Enum):
    WAITING = "waiting"  # placed (and at the prefill gate, if on); its prefill not asked yet
    PREFILLING = "prefilling"  # its prefill instance queues or computes the prompt
    PARKED = "parked"  # prefilled: its KV waits in the prefill pool for admission
    DECODING_LOCAL = "decoding local"  # admitted locally: KV to the decode instance
    # admitted offloaded: KV on the executor beside its prefill instance, decoded by decode
    DECODING_OFFLOADED = "decoding offloaded"
    DONE = "done"  # its last token was produced
    LOST = "lost"  # an actor it depended on was lost: the request reruns

    @property
    def decoding(self) -> bool:
        return self in (Stage.DECODING_LOCAL, Stage.DECODING_OFFLOADED)


class Control(enum.Enum):
    """What the router puts in a request's queue beside its TokenDeltas (never a finish
    reason: those are the tokens' own, "length" or "stop")."""

    ABORT = "abort"  # the request was aborted (Router.abort): stop, free it, end the stream
    RESTART = "restart"  # an actor the attempt depended on was lost: rerun the request


class Restart(Exception):
    """An actor the attempt depended on was lost: rerun the request (serve/recovery.py)."""


@dataclass
class SharedPrefill:
    """A choice's first attempt: the n-choice request's one prefill, on instance ``prefill``."""

    prefill: int
    task: asyncio.Task  # -> list[PrefillResult], one per choice
    index: int


@dataclass(eq=False)
class Attempt:
    """One try of request ``id`` on cluster generation ``gen``, placed at ``where``.

    ``gate``: with ``limits.prefill_when_admissible``, its entry at the prefill gate
    (passed before PREFILLING; its reservation taken back at admission or at ``end``).
    ``epochs``/``actors``: the epoch and handle of each slot (role, index) it has used,
    captured when it first used it; ``lost`` is set once one of them (or the whole
    cluster) is lost. ``reserved``/``mean_kv``/``uncached``: what it counts in ``load`` (the
    ledger of serve/admission.py: its KV at most and over its life, its prompt tokens to
    compute), taken back exactly once by ``end``.
    """

    id: str
    gen: int
    queue: asyncio.Queue
    where: Placement
    load: ClusterLoad
    admission: object  # serve/admission.Admission
    reserved: int
    mean_kv: int
    uncached: int = 0
    shared: SharedPrefill | None = None
    ordinal: int = 0  # the router's placement count at its placement
    gate: object = None  # its prefill gate entry (policy/prefill_gate.py), gate on only
    stage: Stage = Stage.WAITING
    reached: Stage = Stage.WAITING  # the last live stage (kept when DONE or LOST)
    handed_off: bool = False  # its KV has left the prefill instance
    epochs: dict = field(default_factory=dict)
    actors: dict = field(default_factory=dict)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    _prefilled: bool = False
    _ended: bool = False

    @property
    def p(self) -> int:
        return self.where.prefill

    @property
    def d(self) -> int:
        return self.where.decode

    @property
    def offloaded(self) -> bool:
        return self.reached is Stage.DECODING_OFFLOADED

    # -- transitions
    def _to(self, stage: Stage) -> None:
        self.stage = stage
        if stage not in (Stage.DONE, Stage.LOST):
            self.reached = stage

    def placed(self) -> None:
        self.admission.placed(self.load, self.where, self.reserved, self.uncached)

    def prefilling(self) -> None:
        self._to(Stage.PREFILLING)

    def prefilled(self) -> None:
        """Its prefill call returned (or failed): the prompt no longer counts as queued."""
        if not self._prefilled:
            self._prefilled = True
            self.admission.prefilled(self.load, self.where, self.uncached)

    def parked(self) -> None:
        self._to(Stage.PARKED)

    def admitted(self, decision: Placement) -> None:
        self.admission.admitted(self.load, self.where, self.reserved, self.mean_kv,
                                decision.offload)
        self._to(Stage.DECODING_OFFLOADED if decision.offload else Stage.DECODING_LOCAL)

    def done(self) -> None:
        self._to(Stage.DONE)

    def lose(self) -> None:
        """An actor it depends on (or its whole cluster) is lost: whatever it awaits stops
        (``until_lost``), and its queue says RESTART (to a decoding attempt)."""
        if self.lost.is_set():
            return
        if self.stage is not Stage.DONE:
            self._to(Stage.LOST)
        self.lost.set()
        self.queue.put_nowait(Control.RESTART)

    def end(self) -> None:
        """Take back what it counted in the load ledger (once)."""
        if not self._ended:
            self._ended = True
            self.prefilled()  # (ended before its prefill was asked)
            self.admission.ended(self.load, self.where, self.reserved, self.mean_kv,
                                 self.reached.decoding, self.offloaded, self.gate)

    # -- what it depends on
    def use(self, cluster, role: str, i: int):
        """The actor in slot (role, i), its epoch recorded as one the attempt depends on."""
        self.epochs.setdefault((role, i), cluster.epoch(role, i))
        return self.actors.setdefault((role, i), cluster.actor(role, i))

    def depends_on(self, role: str, i: int) -> bool:
        """Whether losing slot (role, i) stops this attempt: the prefill instance until the
        KV left it, the decode instance once admitted, the executor once offloaded."""
        s = self.stage
        if role == "prefill":
            return self.p == i and (s in (Stage.PREFILLING, Stage.PARKED)
                                    or (s.decoding and not self.handed_off))
        if role == "decode":
            return self.d == i and s.decoding
        return self.p == i and s is Stage.DECODING_OFFLOADED

    async def until_lost(self, aw):
        """Await ``aw`` unless the attempt is lost first (then Restart; ``aw`` runs on,
        its outcome ignored: a shielded handoff must finish both of its halves)."""
        task = asyncio.ensure_future(aw)
        task.add_done_callback(consume_error)
        if not task.done() and not self.lost.is_set():
            lost = asyncio.get_running_loop().create_task(self.lost.wait())
            try:
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                lost.cancel()
        if not task.done():  # lost first: stop waiting for it (a future, e.g. a shield,
            task.cancel()  # is done at once once cancelled: decide before cancelling)
            raise Restart()
        return task.result()

    # -- the one cleanup
    async def cleanup(self, serving: Callable[[str, int, int], bool]) -> None:
        """Free what the attempt holds, by the stage it reached, on each actor that still
        ``serving(role, i, epoch)`` (a lost one holds nothing any more); then ``end``.

        DONE holds nothing but an offloaded request's executor pages. Otherwise
        (cancelled, failed midway, or LOST): the prefill instance releases it (unless it
        waits in the n-choice request's shared prefill, released as a whole by the
        router), the decode instance aborts it once admitted, and, decode first (the
        executor's pages are freed only after its last step), the executor frees it.
        Each free is independent: one failing must not skip the others. The executor's
        pages count as taken until it freed them: the next request admitted there must
        find them free (its adopt does not wait for room).
        """
        try:
            calls = []
            if self.stage is not Stage.DONE:
                if self._on_prefill():
                    calls.append(self._free(serving, "prefill", self.p, "release"))
                # Only once admitted is the id known there (else it is kept as aborted).
                if self.reached.decoding:
                    calls.append(self._free(serving, "decode", self.d, "abort"))
            await asyncio.gather(*[c for c in calls if c is not None])
            if self.offloaded:  # by id: also covers an adopt still in flight
                executor = self._free(serving, "executor", self.p, "free_request")
                if executor is not None:
                    await executor
        finally:
            self.end()

    def close(self, generation: int, serving: Callable[[str, int, int], bool]) -> None:
        """The attempt is over (finished, cancelled, failed or lost): ``cleanup`` in the
        background where it holds anything on the cluster of ``generation`` (a replaced
        cluster holds nothing any more), else just ``end``. The load is taken back at once,
        except an executor's pages: those count until the executor freed them."""
        if generation != self.gen or not self.holds_actors():
            self.end()
            return
        detached(self.cleanup(serving))
        if ("executor", self.p) not in self.actors:
            self.end()

    def holds_actors(self) -> bool:
        """Whether ``cleanup`` has anything to free on the actors (else ``end`` will do)."""
        if self.stage is Stage.DONE:
            return self.offloaded
        return self._on_prefill() or self.reached.decoding

    def _on_prefill(self) -> bool:
        """Whether the prefill instance may hold it: from PREFILLING on (a shared prefill's
        choice only once it is its own, from PARKED on)."""
        r = self.reached
        return r is Stage.PARKED or r.decoding or (r is Stage.PREFILLING and not self.shared)

    def _free(self, serving, role: str, i: int, method: str):
        actor = self.actors.get((role, i))
        if actor is None or not serving(role, i, self.epochs[(role, i)]):
            return None
        return self._call_logged(getattr(actor, method).remote(self.id))

    async def _call_logged(self, ref) -> None:
        try:
            await ref
        except Exception as e:  # e.g. the actor is gone: nothing to free there
            log.warning("cleanup of %s: %s", self.id, e)


def detached(coro) -> asyncio.Task:
    """Run ``coro`` as a task outside the current request's context: Serve cancels a
    cancelled request's child calls, and a cleanup or a handoff must not be cancelled."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


def consume_error(task: asyncio.Task) -> None:
    """A done-callback: retrieve a task's exception (its outcome may never be awaited)."""
    if not task.cancelled():
        task.exception()
