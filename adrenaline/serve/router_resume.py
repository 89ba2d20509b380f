"""The ingress's side of recovery: a request outlives the loss of the router replica.

The router owns the cluster of workers, so when its replica dies (kill -9, its node
lost) the workers go with it, and Serve starts a new replica, which starts a new
cluster. The ingress holds what each request has already passed on to its client (the
token ids of each choice), so it sends the request again to the new router carrying
those tokens as output, exactly as the router's own reruns do
(``recovery.recompute_request``): the client sees every token once, and a greedy or
seeded request sees the tokens one uninterrupted run gives (each draw is keyed by seed
and position). An n-choice request is resent as one request per unfinished choice (its
params ``for_choice``, as the router reruns a choice). Each resend has an id of its own
(``<id>~<k>``), so it never meets a leftover of an earlier send on a router that lived.

A loss is a Ray actor error that the router's own code did not raise (the replica
died or is unreachable), or a stream that ends before each choice has its final delta.
``RouterLink`` is the ingress's view of the router: lost from the first loss a stream
sees until a probe (``model_info``) is answered again. Meanwhile /health answers 503,
and every request (a new one too) waits for the router, until ``recovery.timeout_s``
has passed since the loss; past it a request ends with ServiceUnavailableError (HTTP
503 + Retry-After, or an SSE error event with no [DONE]).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import ray.exceptions
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from adrenaline.app_config import RecoveryConfig
from adrenaline.errors import ServiceUnavailableError
from adrenaline.protocol import GenerateRequest, TokenDelta, choice_request_id
from adrenaline.serve.recovery import recompute_request

log = logging.getLogger("adrenaline.serve.router_resume")

PROBE_PAUSE_S = 0.25  # between two failed probes while within recovery.timeout_s


def is_router_loss(exc: BaseException) -> bool:
    """Did the call fail because the router replica is gone (not because of its answer)?

    An exception the router's code raised reaches the ingress as a RayTaskError, which
    also subclasses the original class (e.g. a worker's RayActorError): not a loss.
    """
    if isinstance(exc, ray.exceptions.RayTaskError):
        return False
    return isinstance(exc, (ray.exceptions.RayActorError, ReplicaUnavailableError,
                            DeploymentUnavailableError))


def _detached(coro) -> asyncio.Task:
    """A task outside the current HTTP request's context (Serve cancels its child calls)."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class RouterLink:
    """Whether the router answers, as the ingress last saw it; one per ingress replica."""

    def __init__(self, router, recovery: RecoveryConfig):
        self.router = router
        self._timeout_s = recovery.timeout_s
        self._retry_interval_s = recovery.retry_interval_s
        self.lost_at: float | None = None  # time.monotonic() of the loss; None: up
        self._up: asyncio.Event | None = None  # made on the event loop, on first loss
        self._probe: asyncio.Task | None = None
        self.num_losses = 0  # losses seen since start
        self.num_resends = 0  # requests (choices) sent again after a loss

    @property
    def up(self) -> bool:
        return self.lost_at is None

    def lost(self, why: str) -> None:
        """A stream saw the router go: from now on requests wait for it (idempotent)."""
        if self.lost_at is not None:
            return
        self.lost_at = time.monotonic()
        self.num_losses += 1
        log.warning("the router was lost (%s); requests wait for it for up to %.0f s",
                    why, self._timeout_s)
        if self._up is None:
            self._up = asyncio.Event()
        self._up.clear()
        if self._probe is None or self._probe.done():
            self._probe = _detached(self._probe_until_up())

    async def wait_up(self) -> None:
        """Return once the router answers again; ServiceUnavailableError once
        ``recovery.timeout_s`` has passed since the loss."""
        while self.lost_at is not None:
            left = self.lost_at + self._timeout_s - time.monotonic()
            if left <= 0:
                raise ServiceUnavailableError(
                    f"the router has not come back within recovery.timeout_s "
                    f"({self._timeout_s:g} s); retry later")
            try:
                await asyncio.wait_for(self._up.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _probe_until_up(self) -> None:
        """Ask the router's model_info until it answers: often while within the recovery
        timeout, then every ``recovery.retry_interval_s``."""
        while self.lost_at is not None:
            within = time.monotonic() < self.lost_at + self._timeout_s
            started = time.monotonic()
            try:
                # A call made while no replica runs waits in the handle until one does.
                await asyncio.wait_for(self.router.model_info.remote(),
                                       10.0 if within else self._retry_interval_s)
            except Exception as e:
                log.info("router probe: %s: %s", type(e).__name__, str(e)[:200])
                pause = PROBE_PAUSE_S if within else self._retry_interval_s
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
                continue
            log.warning("the router answers again, %.1f s after the loss",
                        time.monotonic() - self.lost_at)
            self.lost_at = None
            self._up.set()

    def stream(self, req: GenerateRequest, abort: Callable[[str], None]) -> ResumingStream:
        return ResumingStream(self, req, abort)


@dataclass
class _Call:
    """One streaming router call that carries the request, or one choice of it."""

    request_id: str  # the router's id for it
    choice: int | None  # None: every choice (its deltas carry their index); else that one
    gen: object  # Serve's response generator
    pending: asyncio.Task | None = None  # its __anext__ in flight


class ResumingStream:
    """One request's TokenDeltas, resent to the router after a loss (see the module doc).

    ``abort(router_id)`` aborts a router-side id (fire and forget). Iterated through
    ``__anext__``; ``stop_choice`` and ``close`` stop a choice / the whole request.
    """

    def __init__(self, link: RouterLink, req: GenerateRequest, abort: Callable[[str], None]):
        self._link = link
        self._req = req
        self._abort = abort
        n = req.params.n
        self._sent: list[list[int]] = [[] for _ in range(n)]  # tokens passed on, per choice
        self._open = set(range(n))  # choices without a final delta, not stopped
        self._calls: list[_Call] = []
        self._num_sends = 0

    def __aiter__(self) -> ResumingStream:
        return self

    async def __anext__(self) -> TokenDelta:
        while True:
            if not self._calls:
                if not self._open:
                    raise StopAsyncIteration
                await self._link.wait_up()  # ServiceUnavailableError past the timeout
                self._send()
            try:
                call, delta = await self._next()
            except StopAsyncIteration:
                if not self._open:
                    raise
                self._lose("the router ended the stream before its final delta", alive=True)
                continue
            except Exception as e:
                if not is_router_loss(e):
                    raise
                self._lose(f"{type(e).__name__}", alive=isinstance(
                    e, ray.exceptions.ActorUnavailableError))
                continue
            return self._record(call, delta)

    def stop_choice(self, index: int) -> None:
        """Choice ``index`` is over for the client (a stop string): abort it alone."""
        self._open.discard(index)
        for call in self._calls:
            if call.choice is None:
                self._abort(choice_request_id(call.request_id, index))
            elif call.choice == index:
                self._abort(call.request_id)

    def close(self) -> None:
        """Cancel every router call and abort it there (idempotent)."""
        self._open.clear()
        self._drop(abort=True)

    # -- internals -------------------------------------------------------------------------

    def _send(self) -> None:
        """Send the request (again): as it came while no choice has a token passed on,
        else each open choice from its prompt plus the tokens already passed on."""
        req, k = self._req, self._num_sends
        self._num_sends += 1
        rid = req.request_id if k == 0 else f"{req.request_id}~{k}"
        if k > 0:
            self._link.num_resends += len(self._open)
        if not any(self._sent) and len(self._open) == req.params.n:
            parts = [(msgspec.structs.replace(req, request_id=rid), None)]
        elif req.params.n == 1:
            parts = [(msgspec.structs.replace(recompute_request(req, self._sent[0]),
                                              request_id=rid), 0)]
        else:
            parts = [(GenerateRequest(
                request_id=choice_request_id(rid, i), prompt_token_ids=req.prompt_token_ids,
                params=req.params.for_choice(i),
                output_token_ids=list(req.output_token_ids) + self._sent[i]), i)
                for i in sorted(self._open)]
        router = self._link.router.options(stream=True)
        self._calls = [_Call(r.request_id, choice, router.generate.remote(r))
                       for r, choice in parts]

    async def _next(self) -> tuple[_Call, TokenDelta]:
        """The next delta of any call; StopAsyncIteration once every call has ended."""
        while self._calls:
            for call in self._calls:
                if call.pending is None:
                    call.pending = asyncio.ensure_future(call.gen.__anext__())
            await asyncio.wait([c.pending for c in self._calls],
                               return_when=asyncio.FIRST_COMPLETED)
            for call in list(self._calls):
                if call.pending.done():
                    task, call.pending = call.pending, None
                    try:
                        return call, task.result()
                    except StopAsyncIteration:
                        covered = self._open if call.choice is None else {call.choice}
                        if self._open & covered:
                            raise  # ended short: a loss (the call is dropped with the rest)
                        self._calls.remove(call)
        raise StopAsyncIteration

    def _record(self, call: _Call, delta: TokenDelta) -> TokenDelta:
        if call.choice is not None:
            delta.index = call.choice
        delta.request_id = self._req.request_id
        self._sent[delta.index].extend(delta.token_ids)
        if delta.finish_reason is not None:
            self._open.discard(delta.index)
        return delta

    def _lose(self, why: str, alive: bool) -> None:
        """The router was lost mid-request: drop its calls (aborting them on a router that
        may live on) and tell the link; the next ``__anext__`` sends again."""
        self._link.lost(why)
        self._drop(abort=alive)

    def _drop(self, abort: bool) -> None:
        for call in self._calls:
            if call.pending is not None:
                call.pending.cancel()
                call.pending.add_done_callback(_consume)
            call.gen.cancel()
            if abort:
                self._abort(call.request_id)
        self._calls = []


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
