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

Failures: one pass along that path is an *attempt* on one cluster
generation. When an actor dies the supervisor replaces the whole cluster;
every attempt on the old generation stops (Restart) and the request reruns
on the new one from its prompt plus the tokens already yielded (recompute),
so the client sees each token exactly once and, for greedy requests, exactly
the tokens it would have had.

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

import ray
import ray.exceptions
from ray import serve

from adrenaline.actors.cluster import Cluster
from adrenaline.errors import InvalidRequestError
from adrenaline.policy import Placement, make_policy
from adrenaline.protocol import (GenerateRequest, KVReport, ModelInfo, TokenDelta, WorkerMetrics,
                                 choice_request_id)
from adrenaline.app_config import AppArgs
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


def _consume_error(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


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
        self.supervisor = Supervisor(args, _app_name(), self._cluster_lost, self._cluster_ready)
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
        self._groups: dict[str, list[str]] = {}  # n-choice request id -> its choices' ids
        self._tags = itertools.count(1000)  # apart from the decode<->executor channel tags
        self._pollers: list[asyncio.Task] = []
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
                "hangs": list(self.supervisor.hangs),
                "generation": self.supervisor.generation, "state": self.supervisor.state,
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
        await self.supervisor.ready()
        return list(await asyncio.gather(*[w.check_kv.remote() for w in self.cluster.workers]))

    async def worker_pids(self) -> dict[str, list[int]]:
        """Process ids of the current cluster's actors by role (for failure tests)."""
        await self.supervisor.ready()
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
        """One choice's deltas, rerun on a replacement cluster as often as one is lost."""
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._streams[req.request_id] = queue
        produced: list[int] = []  # tokens already yielded: never sent again
        try:
            while True:
                await self.supervisor.ready()  # ServiceUnavailableError if none can start
                if not drain(queue):
                    return  # aborted meanwhile
                attempt = self._attempt(recompute_request(req, produced), queue, shared)
                shared = None  # a rerun prefills again, on its own
                try:
                    async for delta in attempt:
                        produced.extend(delta.token_ids)
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
        gen, cluster = self.supervisor.generation, self.cluster
        p = self.policy.place(req, self.load).prefill
        prefill = _detached(self._call(gen, cluster.prefill[p].prefill.remote(req)))
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
            if finished < n and gen == self.supervisor.generation:
                # Choices still held in the shared blocks (or the prompt still queued) go too.
                _detached(self._release_prefill(cluster, p, req.request_id))

    async def _release_prefill(self, cluster: Cluster, p: int, request_id: str) -> None:
        try:
            await cluster.prefill[p].release.remote(request_id)
        except Exception as e:
            log.warning("cleanup of %s: %s", request_id, e)

    async def _call(self, gen: int, ref):
        """Await an actor call of generation ``gen``; Restart if that cluster was lost."""
        try:
            return await ref
        except InvalidRequestError:
            raise
        except Exception as e:
            if await self.supervisor.is_stale(gen, e):
                raise Restart() from e
            raise

    async def _attempt(self, req: GenerateRequest, queue: asyncio.Queue[TokenDelta],
                       shared: _SharedPrefill | None = None):
        """One pass of a request through the current cluster (see the module docstring).

        With ``shared``, the request is a choice whose prefill is the shared one.
        """
        gen, cluster, load = self.supervisor.generation, self.cluster, self.load
        self._start_pollers()
        where = self.policy.place(req, load)
        if shared is not None:  # the choice's KV is on the shared prefill's instance
            where = Placement(prefill=shared.prefill, decode=where.decode, offload=where.offload)
        p, d = where.prefill, where.decode
        reserved = len(req.prompt_token_ids) + req.params.max_tokens
        # Prompt tokens prefill p is expected to compute (its cached prefix excluded).
        uncached = len(req.prompt_token_ids) - load.cached_prefix_tokens(req)[p]
        prefill = cluster.prefill[p]
        offload, admitted = False, False
        on_executor = False  # an adopt was sent to the executor: free it there at the end
        stage = "prefill"
        self.num_placed += 1
        ordinal = self.num_placed
        adm = self.admission
        adm.placed(load, where, reserved, uncached)
        try:
            try:
                if shared is None:
                    pre = (await self._call(gen, prefill.prefill.remote(req)))[0]
                else:
                    pre = (await asyncio.shield(shared.task))[shared.index]
            finally:
                adm.prefilled(load, where, uncached)
            self._record_prefix(load, p, req, pre)
            yield TokenDelta(request_id=req.request_id, token_ids=pre.token_ids[-1:],
                             logprobs=pre.logprobs[-1:] if pre.logprobs is not None else None,
                             finish_reason=pre.finish_reason)
            if pre.finish_reason is not None:
                stage = "done"
                return
            # Admission: the KV waits in the prefill instance's pool until there is room.
            stage = "admission"
            decision = await adm.wait(self.policy, req, where, load,
                                      lambda: gen == self.supervisor.generation)
            self.admission_log.append((req.request_id, decision.prefill, decision.decode,
                                       decision.offload, ordinal))
            offload, admitted = decision.offload, True
            adm.admitted(load, where, reserved, offload)
            self.num_offloaded += int(offload)
            stage = "handoff"
            on_executor = offload  # from here the executor may hold pages, whatever happens
            # Detached and shielded: a handoff's calls pair up (a gloo send with its receive,
            # an executor adopt with the decode side), so a cancellation must never stop one
            # half; the cleanup frees whatever arrives (see actors' tombstones).
            handoff = _detached(self._handoff(cluster, req, pre, p, d, offload))
            handoff.add_done_callback(_consume_error)  # its error matters only if awaited
            await self._call(gen, asyncio.shield(handoff))
            stage = "decode"
            while True:
                delta = await queue.get()
                if delta.finish_reason == RESTART:
                    raise Restart()
                if delta.finish_reason == "abort":
                    break
                yield delta
                if delta.finish_reason is not None:
                    stage = "done"
                    break
        finally:
            def ended() -> None:
                adm.ended(load, where, reserved, admitted, offload)

            if shared is not None and stage == "prefill":
                ended()  # the shared prefill is released as a whole (see _choices)
            elif gen == self.supervisor.generation and (stage != "done" or on_executor):
                # Cancelled or failed midway: free it wherever it is. Detached from this
                # request's context, since Serve cancels a cancelled request's child calls.
                # (On a lost cluster there is nothing to free: its actors are gone.)
                # Only a request that reached its decode instance is aborted there (an
                # unknown id would be remembered there as aborted-in-flight).
                reached_decode = stage in ("handoff", "decode")
                # An executor's pages count as taken until it freed them: the next request
                # admitted there must find them free (its adopt does not wait for room).
                _detached(self._cleanup(cluster, req.request_id, p, d, stage != "done",
                                        reached_decode,
                                        cluster.executors[p] if on_executor else None,
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

    async def _handoff(self, cluster: Cluster, req: GenerateRequest, pre, p: int, d: int,
                       offload: bool) -> None:
        prefill, decode = cluster.prefill[p], cluster.decode[d]
        if offload:
            # The KV goes to the executor beside the prefill instance (same node: the
            # object moves through shared memory), never to the decode instance.
            handle = await cluster.executors[p].adopt.remote(
                req.request_id, pre, prefill.take_kv.remote(req.request_id))
            await decode.adopt_offloaded.remote(req, pre, p, handle)
        else:
            tag = next(self._tags)
            await asyncio.gather(
                decode.adopt.remote(req, pre, cluster.prefill_rank(p), tag),
                prefill.send_kv.remote(req.request_id, cluster.decode_rank(d), tag,
                                       tuple(pre.kv_shape), pre.kv_dtype))

    def _cluster_lost(self) -> None:
        """Supervisor: the cluster is gone. Stop its pollers, stop every attempt on it."""
        for t in self._pollers:
            t.cancel()  # first: no delta of the lost cluster may follow the sentinel
        self._pollers = []
        for rid, q in self._streams.items():
            q.put_nowait(TokenDelta(request_id=rid, token_ids=[], finish_reason=RESTART))
        self.admission.capacity_freed()  # admission waiters see the new generation and rerun

    def _cluster_ready(self, cluster: Cluster) -> None:
        """Supervisor: a replacement cluster serves; its load starts from zero."""
        self.load = new_load(cluster)

    def _profile(self, args: AppArgs):
        """Start-up measurements for policies that need them (load_aware)."""
        if args.policy != "load_aware":
            return None
        from adrenaline.policy.profile import profile_cluster

        return profile_cluster(self.cluster, args)

    async def _cleanup(self, cluster: Cluster, request_id: str, p: int, d: int, abort: bool,
                       on_decode: bool, executor, then=None) -> None:
        try:
            await self._free_everywhere(cluster, request_id, p, d, abort, on_decode, executor)
        finally:
            if then is not None:
                then()

    async def _free_everywhere(self, cluster: Cluster, request_id: str, p: int, d: int,
                               abort: bool, on_decode: bool, executor) -> None:
        # Each free is independent: one failing must not skip the others.
        calls = []
        if abort:  # decode first: the executor's pages are freed only after its last step
            calls = [cluster.prefill[p].release.remote(request_id)]
            if on_decode:
                calls.append(cluster.decode[d].abort.remote(request_id))
        results = list(await asyncio.gather(*calls, return_exceptions=True))
        if executor is not None:  # by id: also covers an adopt still in flight
            results += await asyncio.gather(executor.free_request.remote(request_id),
                                            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):  # e.g. the actor is gone: nothing to free there
                log.warning("cleanup of %s: %s", request_id, r)

    def _start_pollers(self) -> None:
        # Detached from the request that happens to start them: a request's end or
        # cancellation must not cancel the pollers' calls.
        if not self._pollers:
            gen = self.supervisor.generation
            self._pollers = [_detached(self._poll(gen, j, w))
                             for j, w in enumerate(self.cluster.decode)]

    async def _poll(self, gen: int, index: int, worker) -> None:
        """Fan one decode worker's per-step deltas out to the waiting streams."""
        while gen == self.supervisor.generation:
            try:
                deltas = await worker.poll.remote()
            except ray.exceptions.TaskCancelledError:
                continue  # that call was cancelled; keep polling
            except ray.exceptions.RayActorError as e:
                self.supervisor.report(gen, f"decode {index} died ({type(e).__name__})")
                return
            except Exception as e:
                log.warning("decode worker poll failed: %s", e)
                await asyncio.sleep(1.0)
                continue
            for delta in deltas:
                q = self._streams.get(delta.request_id)
                if q is not None:
                    q.put_nowait(delta)
