"""Router: the Serve deployment that owns the cluster and streams each request through it.

A request's path: validate -> admission limits (refused at once beyond them)
-> the policy places it (prefill i, decode j) -> prefill i samples the first
token (yielded at once: TTFT) -> admission: the policy admits it locally or
offloaded, or it waits, its KV held in prefill i's pool, until capacity
frees -> handoff: locally, decode j posts a receive and prefill i sends the
KV (one tensor, through the communicator); offloaded, the KV goes to the
executor beside prefill i (same node) and decode j only learns the
executor's handle -> decode j streams deltas, which the router gets with one
poll per decode step and fans out to per-request queues -> the last delta
carries finish_reason. A client that goes away cancels the generator; the
finally clause releases the load it counted and frees the request wherever
it is, so no KV block stays held.

Failures: one pass along that path is an *attempt*, with an id of its own
(the request's id, then ``<id>#<n>`` for the n-th rerun: actors never mix two
attempts of one request). When an actor is lost the supervisor replaces it
alone, and only the attempts that depended on it stop (Restart): those it was
prefilling or holding KV for (prefill), handing off or decoding (decode), or
whose offloaded KV it held (executor). Each reruns from its prompt plus the
tokens already yielded (recompute), so the client sees each token exactly
once and exactly the tokens it would have had; the other attempts stream on.
When the whole cluster is replaced (several actors lost) every attempt stops.

An n-choice request is prefilled once (the prefill worker samples each choice's first
token from the same logits and holds the choices sharing the prompt's blocks); from
there each choice is a request of its own (id ``choice_request_id``): placed on a decode
instance, admitted locally or offloaded, handed off and decoded, its deltas tagged with
its ``index``. A rerun reruns one choice (its own prefill).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections import deque
from dataclasses import dataclass

import msgspec
import ray
import ray.exceptions
from ray import serve

from adrenaline.actors.cluster import Cluster
from adrenaline.errors import InvalidRequestError
from adrenaline.policy import Placement, make_policy, needs_profile
from adrenaline.protocol import (GenerateRequest, KVReport, ModelInfo, TokenDelta, WorkerMetrics,
                                 choice_request_id)
from adrenaline.app_config import AppArgs
from adrenaline.policy.prefix import PrefixIndex
from adrenaline.serve.admission import Admission, new_load
from adrenaline.serve.recovery import RESTART, Restart, drain, recompute_request
from adrenaline.serve.supervisor import Supervisor

log = logging.getLogger(__name__)


def _detached(coro) -> asyncio.Task:
    """Run ``coro`` as a task outside the current request's context (see callers)."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside Serve (tests)
        return "adrenaline"


async def _awaited(ref):
    """An actor call's result, as a coroutine (to run it as a task)."""
    return await ref


def _consume_error(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class _AttemptState:
    """One attempt's place in the cluster: what it depends on, so a loss stops only it.

    ``epochs``: the epoch of each slot (role, index) it has used, captured when it first
    used it; ``lost`` is set when one of them is lost (or the whole cluster is).
    """

    attempt_id: str
    gen: int
    queue: asyncio.Queue
    p: int = -1
    d: int = -1
    offload: bool = False
    stage: str = "prefill"
    epochs: dict = None
    lost: asyncio.Event = None

    def __post_init__(self) -> None:
        self.epochs = {}
        self.lost = asyncio.Event()

    def depends_on(self, role: str, i: int) -> bool:
        if role == "prefill":
            return self.p == i and self.stage in ("prefill", "admission", "handoff")
        if role == "decode":
            return self.d == i and self.stage in ("handoff", "decode")
        return self.offload and self.p == i and self.stage in ("handoff", "decode")


def attempt_id(request_id: str, rerun: int) -> str:
    """The id actors know an attempt by: the request's own id first, then one per rerun."""
    return request_id if rerun == 0 else f"{request_id}#{rerun}"


@dataclass
class _SharedPrefill:
    """A choice's first attempt: the n-choice request's one prefill, on instance ``prefill``."""

    prefill: int
    task: asyncio.Task  # -> list[PrefillResult], one per choice
    index: int


@serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, args: AppArgs):
        self.args = args
        self.supervisor = Supervisor(args, _app_name(), self._cluster_lost, self._cluster_ready,
                                     self._actor_lost, self._actor_ready)
        self.policy = make_policy(args.policy, args.policy_options, self._profile(args))
        first = self.cluster.prefill_info[0]
        self.info = ModelInfo(
            name=args.model_name, model_dir=first.model_dir, max_model_len=first.max_model_len,
            vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
            max_request_tokens=min(i.max_request_tokens
                                   for i in self.cluster.prefill_info + self.cluster.decode_info))
        # Load of the current cluster; an attempt updates the object it started with.
        self.load = new_load(self.cluster)
        self._streams: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._attempts: dict[str, _AttemptState] = {}  # attempt id -> its state
        self._groups: dict[str, list[str]] = {}  # n-choice request id -> its choices' ids
        self._tags = itertools.count(1000)  # apart from the decode<->executor channel tags
        self._pollers: dict[int, asyncio.Task] = {}  # decode index -> its poller
        self.admission = Admission(args.limits)  # limits, waiters, load ledger
        self.num_placed = 0  # requests placed since start (attempts, reruns included)
        self.num_offloaded = 0  # of which offloaded
        self.num_reruns = 0  # attempts rerun on a replacement cluster
        # (request id, prefill, decode, offloaded, placement ordinal) per admission, oldest
        # first (bounded); the ordinal is num_placed at its placement.
        self.admission_log: deque[tuple[str, int, int, bool, int]] = deque(maxlen=4096)

    @property
    def cluster(self) -> Cluster:
        return self.supervisor.cluster

    async def stats(self) -> dict:
        """Router-level counters (placement, limits, recovery), for benchmarks and tests."""
        self.supervisor.start()
        adm = self.admission
        return {"num_placed": self.num_placed, "num_offloaded": self.num_offloaded,
                "num_ongoing": adm.num_ongoing, "num_queued": adm.num_queued,
                "num_refused": adm.num_refused, "num_reruns": self.num_reruns,
                "num_recoveries": self.supervisor.num_recoveries,
                "num_cluster_replacements": self.supervisor.num_cluster_replacements,
                "num_losses": self.supervisor.num_losses,
                "hangs": list(self.supervisor.hangs),
                "generation": self.supervisor.generation, "state": self.supervisor.state,
                "links": {f"{a[0]}{a[1]}-{b[0]}{b[1]}": kind
                          for (a, b), kind in getattr(self.cluster, "link_kinds", {}).items()},
                "profile": (self.policy.profile.summary()
                            if getattr(self.policy, "profile", None) is not None else None),
                "b_max": getattr(self.policy, "b_max", None),
                "ob_mem": getattr(self.policy, "ob_mem", None)}

    async def admissions(self) -> list[tuple[str, int, int, bool, int]]:
        """The admission log: (request id, prefill, decode, offloaded, placement ordinal),
        oldest first."""
        return list(self.admission_log)

    async def model_info(self) -> ModelInfo:
        """The model's facts; ServiceUnavailableError while no cluster can be started
        (so /health answers 503 then)."""
        self.supervisor.start()
        self.supervisor.raise_if_down()
        return self.info

    async def metrics(self) -> list[WorkerMetrics]:
        return list(await asyncio.gather(*[w.metrics.remote() for w in self.cluster.workers]))

    async def check_kv(self) -> list[KVReport]:
        """Every actor's KV accounting audit (prefill, decode, executor order)."""
        await self.supervisor.settled()
        return list(await asyncio.gather(*[w.check_kv.remote() for w in self.cluster.workers]))

    async def worker_pids(self) -> dict[str, list[int]]:
        """Process ids of the current cluster's actors by role (for failure tests)."""
        await self.supervisor.settled()
        c = self.cluster
        pids = await asyncio.gather(*[w.pid.remote() for w in c.workers])
        n_p, n_d = len(c.prefill), len(c.decode)
        return {"prefill": pids[:n_p], "decode": pids[n_p:n_p + n_d], "executor": pids[n_p + n_d:]}

    async def abort(self, request_id: str) -> None:
        for rid in self._groups.get(request_id, [request_id]):
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(TokenDelta(request_id=rid, token_ids=[], finish_reason="abort"))

    def validate(self, req: GenerateRequest) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        final_len = min(n + req.params.max_tokens, self.info.max_model_len)
        if n >= self.info.max_model_len:
            raise InvalidRequestError(f"prompt has {n} tokens; the context is "
                                      f"{self.info.max_model_len} tokens")
        if final_len > self.info.max_request_tokens:
            raise InvalidRequestError(f"prompt plus max_tokens needs {final_len} tokens of KV "
                                      f"cache; an instance holds {self.info.max_request_tokens}")
        if req.request_id in self._streams or req.request_id in self._groups:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")

    async def generate(self, req: GenerateRequest):
        """Async generator of TokenDelta for one request (call with stream=True)."""
        self.validate(req)
        self.admission.refuse_if_overloaded()
        self.supervisor.start()
        self.supervisor.raise_if_down()
        self.admission.num_ongoing += 1
        try:
            if req.params.n == 1:
                async for delta in self._choice(req, None):
                    yield delta
            else:
                async for delta in self._choices(req):
                    yield delta
        finally:
            self.admission.num_ongoing -= 1

    async def _choice(self, req: GenerateRequest, shared: _SharedPrefill | None):
        """One choice's deltas, rerun as often as an actor it depends on is lost."""
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._streams[req.request_id] = queue
        produced: list[int] = []  # tokens already yielded: never sent again
        try:
            for rerun in itertools.count():
                await self.supervisor.ready()  # ServiceUnavailableError if none can start
                if not drain(queue):
                    return  # aborted meanwhile
                again = msgspec.structs.replace(recompute_request(req, produced),
                                                request_id=attempt_id(req.request_id, rerun))
                attempt = self._attempt(again, queue, shared, req.request_id)
                shared = None  # a rerun prefills again, on its own
                try:
                    async for delta in attempt:
                        produced.extend(delta.token_ids)
                        delta.request_id = req.request_id
                        yield delta
                        if delta.finish_reason is not None:
                            return
                    return  # aborted
                except Restart:
                    self.num_reruns += 1
                finally:
                    await attempt.aclose()  # its finally frees what it holds
        finally:
            self._streams.pop(req.request_id, None)

    async def _choices(self, req: GenerateRequest):
        """An n-choice request: one prefill, then each choice on its own, deltas merged."""
        n = req.params.n
        ids = [choice_request_id(req.request_id, i) for i in range(n)]
        self._groups[req.request_id] = ids
        await self.supervisor.ready()
        p = self.policy.place(req, self.load).prefill
        await self.supervisor.wait_slots([("prefill", p)])
        cluster = self.cluster
        epoch = cluster.epoch("prefill", p)
        prefill = _detached(_awaited(cluster.prefill[p].prefill.remote(req)))
        prefill.add_done_callback(_consume_error)  # each choice awaits it
        merged: asyncio.Queue = asyncio.Queue()
        ended = finished = 0  # choices whose stream ended / that ended with a finish reason

        async def run(i: int) -> None:
            child = GenerateRequest(request_id=ids[i], prompt_token_ids=req.prompt_token_ids,
                                    params=req.params.for_choice(i))
            try:
                async for delta in self._choice(child, _SharedPrefill(p, prefill, i)):
                    delta.index = i
                    merged.put_nowait(delta)
                merged.put_nowait(None)  # this choice is over (finished, or aborted alone)
            except Exception as e:
                merged.put_nowait(e)

        tasks = [asyncio.get_running_loop().create_task(run(i)) for i in range(n)]
        try:
            while ended < n:
                item = await merged.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    ended += 1
                    continue
                yield item
                finished += item.finish_reason is not None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._groups.pop(req.request_id, None)
            if finished < n and self.supervisor.is_current("prefill", p, epoch):
                # Choices still held in the shared blocks (or the prompt still queued) go too.
                _detached(self._release_prefill(cluster, p, req.request_id))

    async def _release_prefill(self, cluster: Cluster, p: int, request_id: str) -> None:
        try:
            await cluster.prefill[p].release.remote(request_id)
        except Exception as e:
            log.warning("cleanup of %s: %s", request_id, e)

    async def _guard(self, st: _AttemptState, aw):
        """Await ``aw`` unless the attempt is lost first (then Restart; ``aw`` runs on,
        its outcome ignored: a shielded handoff must finish both of its halves)."""
        task = asyncio.ensure_future(aw)
        task.add_done_callback(_consume_error)
        if not task.done() and not st.lost.is_set():
            lost = asyncio.get_running_loop().create_task(st.lost.wait())
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

    async def _call(self, st: _AttemptState, slot: tuple[str, int] | None, aw):
        """Await an actor call of the attempt; Restart if what it depends on was lost.

        A call to a dead actor (``slot``) proves that actor lost (and is reported here).
        Any other error may be a symptom of a peer's loss (a broken link) that the
        watchers report a moment later, so wait a few seconds for them.
        """
        try:
            return await self._guard(st, aw)
        except (InvalidRequestError, Restart):
            raise
        except Exception as e:
            if isinstance(e, ray.exceptions.RayActorError) and slot is not None:
                self.supervisor.report_actor(st.gen, *slot, st.epochs.get(slot, 0),
                                             f"{slot[0]} {slot[1]} died ({type(e).__name__})")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while not st.lost.is_set() and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if st.lost.is_set():
                raise Restart() from e
            raise

    def _use(self, st: _AttemptState, role: str, i: int):
        """The actor in slot (role, i), its epoch recorded as one the attempt depends on."""
        st.epochs.setdefault((role, i), self.cluster.epoch(role, i))
        return self.cluster.actor(role, i)

    async def _attempt(self, req: GenerateRequest, queue: asyncio.Queue[TokenDelta],
                       shared: _SharedPrefill | None = None, client_id: str = ""):
        """One pass of a request through the current cluster (see the module docstring).

        ``req.request_id`` is the attempt's id, ``client_id`` the request's. With
        ``shared``, the request is a choice whose prefill is the shared one.
        """
        while True:
            load = self.load
            where = self.policy.place(req, load)
            if shared is not None:  # the choice's KV is on the shared prefill's instance
                where = Placement(prefill=shared.prefill, decode=where.decode,
                                  offload=where.offload)
                break
            await self.supervisor.wait_slots([("prefill", where.prefill)])
            if self.load is load:  # else the whole cluster was replaced meanwhile: again
                break
        p, d = where.prefill, where.decode
        gen, cluster = self.supervisor.generation, self.cluster
        st = _AttemptState(req.request_id, gen, queue, p=p, d=d)
        self._attempts[req.request_id] = st
        self._start_pollers()
        reserved = len(req.prompt_token_ids) + req.params.max_tokens
        # Prompt tokens prefill p is expected to compute (its cached prefix excluded).
        uncached = len(req.prompt_token_ids) - load.cached_prefix_tokens(req)[p]
        prefill = self._use(st, "prefill", p)
        offload, admitted = False, False
        on_executor = False  # an adopt was sent to the executor: free it there at the end
        decode_actor = executor = None
        self.num_placed += 1
        ordinal = self.num_placed
        adm = self.admission
        adm.placed(load, where, reserved, uncached)
        try:
            try:
                if shared is None:
                    pre = (await self._call(st, ("prefill", p),
                                            prefill.prefill.remote(req)))[0]
                else:
                    pre = (await self._call(st, ("prefill", p),
                                            asyncio.shield(shared.task)))[shared.index]
            finally:
                adm.prefilled(load, where, uncached)
            self._record_prefix(load, p, req, pre)
            yield TokenDelta(request_id=req.request_id, token_ids=pre.token_ids[-1:],
                             logprobs=pre.logprobs[-1:] if pre.logprobs is not None else None,
                             finish_reason=pre.finish_reason,
                             prompt_logprobs=pre.prompt_logprobs, prompt_ranks=pre.prompt_ranks)
            if pre.finish_reason is not None:
                st.stage = "done"
                return
            # Admission: the KV waits in the prefill instance's pool until there is room.
            st.stage = "admission"
            decision = await adm.wait(self.policy, req, where, load,
                                      lambda: not st.lost.is_set())
            self.admission_log.append((client_id or req.request_id, decision.prefill,
                                       decision.decode, decision.offload, ordinal))
            offload, admitted = decision.offload, True
            adm.admitted(load, where, reserved, offload)
            self.num_offloaded += int(offload)
            needs = [("decode", d)] + ([("executor", p)] if offload else [])
            await self._guard(st, self.supervisor.wait_slots(needs))
            if self.supervisor.generation != gen:
                raise Restart()
            st.offload, st.stage = offload, "handoff"
            decode_actor = self._use(st, "decode", d)
            executor = self._use(st, "executor", p) if offload else None
            on_executor = offload  # from here the executor may hold pages, whatever happens
            # Detached and shielded: a handoff's calls pair up (a gloo send with its receive,
            # an executor adopt with the decode side), so a cancellation must never stop one
            # half; the cleanup frees whatever arrives (see actors' tombstones).
            handoff = _detached(self._handoff(cluster, st, req, pre, prefill, decode_actor,
                                              executor))
            handoff.add_done_callback(_consume_error)  # its error matters only if awaited
            await self._call(st, None, asyncio.shield(handoff))
            st.stage = "decode"
            while True:
                delta = await queue.get()
                if delta.finish_reason == RESTART:
                    raise Restart()
                if delta.finish_reason == "abort":
                    break
                yield delta
                if delta.finish_reason is not None:
                    st.stage = "done"
                    break
        finally:
            self._attempts.pop(req.request_id, None)

            def ended() -> None:
                adm.ended(load, where, reserved, admitted, offload)

            if shared is not None and st.stage == "prefill":
                ended()  # the shared prefill is released as a whole (see _choices)
            elif gen == self.supervisor.generation and (st.stage != "done" or on_executor):
                # Cancelled, failed midway or restarted: free it wherever it is, on the
                # actors still serving (a lost one holds nothing any more). Detached from
                # this request's context, since Serve cancels a cancelled request's child
                # calls. Only a request that reached its decode instance is aborted there
                # (an unknown id would be remembered there as aborted-in-flight).
                reached_decode = st.stage in ("handoff", "decode")
                # An executor's pages count as taken until it freed them: the next request
                # admitted there must find them free (its adopt does not wait for room).
                _detached(self._cleanup(st, req.request_id, st.stage != "done",
                                        prefill, decode_actor if reached_decode else None,
                                        executor if on_executor else None,
                                        then=ended if on_executor else None))
                if not on_executor:
                    ended()
            else:
                ended()

    @staticmethod
    def _record_prefix(load, p: int, req: GenerateRequest, pre) -> None:
        """Prefill p now holds the prompt's full blocks, less what its step evicted."""
        if load.prefill_prefix:
            index = load.prefill_prefix[p]
            index.remove(pre.evicted_hashes)
            index.add(load.prompt_block_hashes(req))

    async def _handoff(self, cluster: Cluster, st: _AttemptState, req: GenerateRequest, pre,
                       prefill, decode, executor) -> None:
        """Move the KV to decode (or to the executor); each call names the epoch of the
        actor at its other end, so none reaches a replacement that knows nothing of it."""
        p, d = st.p, st.d
        if executor is not None:
            # The KV goes to the executor beside the prefill instance (same node: the
            # object moves through shared memory), never to the decode instance.
            handle = await executor.adopt.remote(
                req.request_id, pre, prefill.take_kv.remote(req.request_id))
            await decode.adopt_offloaded.remote(req, pre, p, handle,
                                                st.epochs[("executor", p)])
        else:
            tag = next(self._tags)
            await asyncio.gather(
                decode.adopt.remote(req, pre, cluster.prefill_rank(p), tag,
                                    st.epochs[("prefill", p)]),
                prefill.send_kv.remote(req.request_id, cluster.decode_rank(d), tag,
                                       tuple(pre.kv_shape), pre.kv_dtype,
                                       st.epochs[("decode", d)]))

    def _cluster_lost(self) -> None:
        """Supervisor: the cluster is gone. Stop its pollers, stop every attempt on it."""
        for t in self._pollers.values():
            t.cancel()  # first: no delta of the lost cluster may follow the sentinel
        self._pollers = {}
        for st in self._attempts.values():
            st.lost.set()
        for rid, q in self._streams.items():
            q.put_nowait(TokenDelta(request_id=rid, token_ids=[], finish_reason=RESTART))
        self.admission.capacity_freed()  # admission waiters see the new generation and rerun

    def _cluster_ready(self, cluster: Cluster) -> None:
        """Supervisor: a replacement cluster serves; its load starts from zero."""
        self.load = new_load(cluster)

    def _actor_lost(self, role: str, i: int) -> None:
        """Supervisor: one actor is lost. Stop the attempts that depended on it only."""
        if role == "decode":
            poller = self._pollers.pop(i, None)
            if poller is not None:
                poller.cancel()
        for st in self._attempts.values():
            if st.depends_on(role, i) and not st.lost.is_set():
                st.lost.set()
                if st.stage == "decode":
                    st.queue.put_nowait(TokenDelta(request_id=st.attempt_id, token_ids=[],
                                                   finish_reason=RESTART))
        self.admission.capacity_freed()  # lost admission waiters rerun

    def _actor_ready(self, role: str, i: int) -> None:
        """Supervisor: slot (role, i) serves again, with a new actor."""
        if role == "prefill" and self.load.prefill_prefix:  # its prefix cache starts empty
            info = self.cluster.prefill_info[i]
            self.load.prefill_prefix[i] = PrefixIndex(info.num_kv_blocks, info.block_size)
        if role == "decode":
            self._start_pollers()
        self.admission.capacity_freed()

    def _profile(self, args: AppArgs):
        """Start-up measurements, for a policy that declares it needs them."""
        if not needs_profile(args.policy):
            return None
        from adrenaline.actors.cluster_profile import profile_cluster

        return profile_cluster(self.cluster, args)

    async def _cleanup(self, st: _AttemptState, request_id: str, abort: bool, prefill, decode,
                       executor, then=None) -> None:
        try:
            await self._free_everywhere(st, request_id, abort, prefill, decode, executor)
        finally:
            if then is not None:
                then()

    async def _free_everywhere(self, st: _AttemptState, request_id: str, abort: bool, prefill,
                               decode, executor) -> None:
        """Free the attempt on each actor it used that still serves (each free independent:
        one failing must not skip the others)."""
        def serving(role: str, i: int) -> bool:
            return self.supervisor.is_current(role, i, st.epochs.get((role, i), -1))

        calls = []
        if abort:  # decode first: the executor's pages are freed only after its last step
            if serving("prefill", st.p):
                calls.append(prefill.release.remote(request_id))
            if decode is not None and serving("decode", st.d):
                calls.append(decode.abort.remote(request_id))
        results = list(await asyncio.gather(*calls, return_exceptions=True))
        if executor is not None and serving("executor", st.p):  # by id: also covers an
            results += await asyncio.gather(  # adopt still in flight
                executor.free_request.remote(request_id), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):  # e.g. the actor is gone: nothing to free there
                log.warning("cleanup of %s: %s", request_id, r)

    def _start_pollers(self) -> None:
        # Detached from the request that happens to start them: a request's end or
        # cancellation must not cancel the pollers' calls.
        gen = self.supervisor.generation
        for j in range(len(self.cluster.decode)):
            running = self._pollers.get(j)
            if (running is None or running.done()) and self.supervisor.is_current(
                    "decode", j, self.cluster.epoch("decode", j)):
                self._pollers[j] = _detached(self._poll(gen, j, self.cluster.epoch("decode", j),
                                                        self.cluster.decode[j]))

    async def _poll(self, gen: int, index: int, epoch: int, worker) -> None:
        """Fan one decode worker's per-step deltas out to the waiting streams."""
        while self.supervisor.is_current("decode", index, epoch) and \
                gen == self.supervisor.generation:
            try:
                deltas = await worker.poll.remote()
            except ray.exceptions.TaskCancelledError:
                continue  # that call was cancelled; keep polling
            except ray.exceptions.RayActorError as e:
                self.supervisor.report_actor(gen, "decode", index, epoch,
                                             f"decode {index} died ({type(e).__name__})")
                return
            except Exception as e:
                log.warning("decode worker poll failed: %s", e)
                await asyncio.sleep(1.0)
                continue
            for delta in deltas:
                st = self._attempts.get(delta.request_id)
                if st is not None:
                    st.queue.put_nowait(delta)
