"""Router: the Serve deployment that owns the cluster and streams each request through it.

A request's path, once validated (adrenaline/request_length.py) and within the admission
limits (refused at once beyond them), is one *attempt* (serve/attempt.py) or, after an
actor loss, several; ``_attempt`` reads top-down through its stages:

* WAITING: the policy places it (prefill i, decode j); its load is counted from here.
  With ``limits.prefill_when_admissible`` it then waits at the prefill gate, in arrival
  order, until the policy would admit it to decode (policy/prefill_gate.py).
* PREFILLING: prefill i samples the first token (yielded at once: TTFT).
* PARKED: its KV is held in prefill i's pool until the policy admits it, locally or
  offloaded (admission waits in arrival order, serve/admission.py).
* DECODING_LOCAL: decode j posts a receive and prefill i sends the KV (one tensor,
  through the communicator). DECODING_OFFLOADED: the KV goes to the executor beside
  prefill i (same node) and decode j only learns the executor's handle. Decode j
  streams deltas, which the router gets with one poll per decode step and fans out to
  the attempts' queues; the last delta carries finish_reason (DONE).

A client that goes away cancels the generator; the attempt's ``close`` frees it by the
stage it reached and takes back the load it counted, so no KV block stays held.

Failures: each attempt has an id of its own (the request's id, then ``<id>#<n>`` for
the n-th rerun: actors never mix two attempts of one request). When an actor is lost
the supervisor replaces it alone, and only the attempts that depended on it
(``Attempt.depends_on``) become LOST; each reruns from its prompt plus the tokens
already yielded (serve/recovery.py), so the client sees each token exactly once and
exactly the tokens it would have had; the other attempts stream on. When the whole
cluster is replaced (several actors lost) every attempt is lost.

An n-choice request is prefilled once (the prefill worker samples each choice's first
token from the same logits and holds the choices sharing the prompt's blocks); from
there each choice is a request of its own (id ``choice_request_id``): placed on a decode
instance, admitted locally or offloaded, handed off and decoded, its deltas tagged with
its ``index``. A rerun reruns one choice (its own prefill).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

import msgspec
import ray
import ray.exceptions
from ray import serve

from adrenaline.actors.cluster import Cluster
from adrenaline.errors import InvalidRequestError
from adrenaline.policy import Placement, make_policy, needs_profile
from adrenaline.request_length import check_request_length
from adrenaline.protocol import (GenerateRequest, KVReport, ModelInfo, TokenDelta, WorkerMetrics,
                                 choice_request_id)
from adrenaline.app_config import AppArgs
from adrenaline.policy.prefix import PrefixIndex
from adrenaline.serve.admission import Admission, new_load
from adrenaline.serve.attempt import (Attempt, Control, Restart, SharedPrefill, Stage,
                                      consume_error, detached)
from adrenaline.serve.recovery import attempt_id, drain, recompute_request
from adrenaline.serve.supervisor import Supervisor

log = logging.getLogger(__name__)


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # constructed outside Serve (tests)
        return "adrenaline"


async def _awaited(ref):
    """An actor call's result, as a coroutine (to run it as a task)."""
    return await ref


@serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, args: AppArgs):
        self.args = args
        self.supervisor = Supervisor(args, _app_name(), self._cluster_lost, self._cluster_ready,
                                     self._actor_lost, self._actor_ready, self._heartbeat)
        self.policy = make_policy(args.policy, args.policy_options, self._profile(args))
        first = self.cluster.prefill_info[0]
        self.info = ModelInfo(
            name=args.model_name, model_dir=first.model_dir, max_model_len=first.max_model_len,
            vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids,
            max_request_tokens=min(i.max_request_tokens
                                   for i in self.cluster.prefill_info + self.cluster.decode_info))
        # Load of the current cluster; an attempt updates the object it started with.
        self.load = new_load(self.cluster)
        self._streams: dict[str, asyncio.Queue[TokenDelta | Control]] = {}  # request id ->
        self._attempts: dict[str, Attempt] = {}  # attempt id -> the attempt running now
        self._groups: dict[str, list[str]] = {}  # n-choice request id -> its choices' ids
        self._tags = itertools.count(1000)  # apart from the decode<->executor channel tags
        self._pollers: dict[int, asyncio.Task] = {}  # decode index -> its poller
        self.admission = Admission(args.limits, self.policy)  # limits, waiters, gate, ledger
        self.num_placed = 0  # requests placed since start (attempts, reruns included)
        self.num_offloaded = 0  # of which offloaded
        self.num_reruns = 0  # attempts that lost an actor and reran (either way of recovery)
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
                # prefill gate (limits.prefill_when_admissible): waiting at it / passed it
                # and not yet admitted (both 0 when off)
                "num_gate_waiting": adm.gate.num_queued if adm.gate else 0,
                "num_gate_passed": adm.gate.num_passed if adm.gate else 0,
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
                # served over modeled decode step, per decode instance (load_aware)
                "step_scale": ([self.policy.step_scale(d)
                                for d in range(len(self.cluster.decode_info))]
                               if hasattr(self.policy, "step_scale") else None),
                "ob_mem": getattr(self.policy, "ob_mem", None)}

    def _heartbeat(self, role: str, index: int, m: WorkerMetrics) -> None:
        """Each heartbeat's metrics: a decode worker's served steps go to the policy."""
        if role != "decode":
            return
        try:  # a user policy's failure must not stop the heartbeat that called this
            self.policy.observe_decode_steps(index, m.num_steps, m.step_time_s,
                                             m.batch_size_sum, m.local_kv_tokens_sum)
        except Exception:
            log.exception("policy %s: observe_decode_steps failed", self.args.policy)

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

    async def hold_steps(self, role: str, i: int, held: bool) -> None:
        """For tests: hold (or let go) the steps of the worker in slot (role, i), so that
        an event a test asserts is certain, not timed (EngineWorker.hold_steps)."""
        await self.cluster.actor(role, i).hold_steps.remote(held)

    async def abort(self, request_id: str) -> None:
        for rid in self._groups.get(request_id, [request_id]):
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(Control.ABORT)

    def validate(self, req: GenerateRequest) -> None:
        if not req.prompt_token_ids:
            raise InvalidRequestError("prompt is empty")
        check_request_length(len(req.prompt_token_ids), req.params.max_tokens,
                             self.info.max_model_len, self.info.max_request_tokens)
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

    async def _choice(self, req: GenerateRequest, shared: SharedPrefill | None):
        """One choice's deltas, rerun as often as an actor it depends on is lost."""
        queue: asyncio.Queue[TokenDelta | Control] = asyncio.Queue()
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
        prefill = detached(_awaited(cluster.prefill[p].prefill.remote(req)))
        prefill.add_done_callback(consume_error)  # each choice awaits it
        merged: asyncio.Queue = asyncio.Queue()
        ended = finished = 0  # choices whose stream ended / that ended with a finish reason

        async def run(i: int) -> None:
            child = GenerateRequest(request_id=ids[i], prompt_token_ids=req.prompt_token_ids,
                                    params=req.params.for_choice(i))
            try:
                async for delta in self._choice(child, SharedPrefill(p, prefill, i)):
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
                detached(self._release_prefill(cluster, p, req.request_id))

    async def _release_prefill(self, cluster: Cluster, p: int, request_id: str) -> None:
        try:
            await cluster.prefill[p].release.remote(request_id)
        except Exception as e:
            log.warning("cleanup of %s: %s", request_id, e)

    # -- one attempt, top-down: its stages are serve/attempt.py's
    async def _attempt(self, req: GenerateRequest, queue: asyncio.Queue,
                       shared: SharedPrefill | None = None, client_id: str = ""):
        """One pass of a request through the current cluster (see the module docstring).

        ``req.request_id`` is the attempt's id, ``client_id`` the request's. With
        ``shared``, the request is a choice whose prefill is the shared one.
        """
        a = await self._place(req, queue, shared)  # WAITING
        try:
            await self._gate(a, req)  # WAITING, until decode could take it (gate on)
            pre = await self._prefill(a, req)  # PREFILLING: the first token
            if pre.finish_reason is not None:
                a.done()  # DONE (marked first: the consumer may close us at the yield)
            yield TokenDelta(request_id=a.id, token_ids=pre.token_ids[-1:],
                             logprobs=pre.logprobs[-1:] if pre.logprobs is not None else None,
                             finish_reason=pre.finish_reason,
                             prompt_logprobs=pre.prompt_logprobs, prompt_ranks=pre.prompt_ranks)
            if a.stage is Stage.DONE:
                return
            a.parked()  # PARKED: the KV waits in the prefill pool until there is room
            await self._admit(a, req, client_id)  # DECODING_LOCAL or DECODING_OFFLOADED
            await self._hand_off(a, req, pre)
            while (item := await queue.get()) is not Control.ABORT:
                if item is Control.RESTART:
                    raise Restart()
                if item.finish_reason is not None:
                    a.done()  # DONE
                yield item
                if a.stage is Stage.DONE:
                    return
        finally:
            self._attempts.pop(a.id, None)
            a.close(self.supervisor.generation, self.supervisor.is_current)

    async def _place(self, req: GenerateRequest, queue: asyncio.Queue,
                     shared: SharedPrefill | None) -> Attempt:
        """The policy places the request on a cluster whose prefill slot serves; its load
        is counted from here (so placements made meanwhile see it)."""
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
        n = len(req.prompt_token_ids)
        a = Attempt(req.request_id, self.supervisor.generation, queue, where, load,
                    self.admission, reserved=self.policy.request_tokens(req),
                    mean_kv=self.policy.request_mean_tokens(req), shared=shared,
                    # prompt tokens the prefill instance is expected to compute
                    uncached=n - load.cached_prefix_tokens(req)[where.prefill])
        self._attempts[a.id] = a
        self._start_pollers()
        self.num_placed += 1
        a.ordinal = self.num_placed
        a.placed()
        return a

    async def _gate(self, a: Attempt, req: GenerateRequest) -> None:
        """With the prefill gate on, wait until the policy would admit the request to
        decode, those gated through before it counted (serve/admission.py). A choice of an
        n-choice request skips it: its shared prefill is already asked."""
        if a.shared is not None:
            return
        a.gate = self.admission.enter_gate(req, a.where, a.load, a.reserved, a.mean_kv)
        if a.gate is not None and not a.gate.waiter.done():
            await a.until_lost(a.gate.waiter)

    async def _prefill(self, a: Attempt, req: GenerateRequest):
        a.prefilling()
        prefill = a.use(self.cluster, "prefill", a.p)
        try:
            if a.shared is None:
                pre = (await self._call(a, ("prefill", a.p), prefill.prefill.remote(req)))[0]
            else:
                pre = (await self._call(a, ("prefill", a.p),
                                        asyncio.shield(a.shared.task)))[a.shared.index]
        finally:
            a.prefilled()
        self._record_prefix(a.load, a.p, req, pre)
        return pre

    async def _admit(self, a: Attempt, req: GenerateRequest, client_id: str) -> None:
        """Wait until the policy admits it (locally or offloaded), then for its slots."""
        decision = await self.admission.wait(self.policy, req, a.where, a.load,
                                             lambda: not a.lost.is_set(), a.gate)
        self.admission_log.append((client_id or a.id, decision.prefill, decision.decode,
                                   decision.offload, a.ordinal))
        a.admitted(decision)
        self.num_offloaded += int(a.offloaded)
        needs = [("decode", a.d)] + ([("executor", a.p)] if a.offloaded else [])
        await a.until_lost(self.supervisor.wait_slots(needs))
        if self.supervisor.generation != a.gen:
            raise Restart()

    async def _hand_off(self, a: Attempt, req: GenerateRequest, pre) -> None:
        """Move the KV to the decode instance (or to the executor beside the prefill one).

        Detached and shielded: a handoff's calls pair up (a gloo send with its receive, an
        executor adopt with the decode side), so a cancellation must never stop one half;
        the cleanup frees whatever arrives (see actors' tombstones).
        """
        cluster = self.cluster
        prefill, decode = a.use(cluster, "prefill", a.p), a.use(cluster, "decode", a.d)
        executor = a.use(cluster, "executor", a.p) if a.offloaded else None
        handoff = detached(self._move_kv(cluster, a, req, pre, prefill, decode, executor))
        handoff.add_done_callback(consume_error)  # its error matters only if awaited
        await self._call(a, None, asyncio.shield(handoff))
        a.handed_off = True

    async def _move_kv(self, cluster: Cluster, a: Attempt, req: GenerateRequest, pre,
                       prefill, decode, executor) -> None:
        """Each call names the epoch of the actor at its other end, so none reaches a
        replacement that knows nothing of it."""
        p, d = a.p, a.d
        if executor is not None:
            # The KV goes to the executor beside the prefill instance (same node: the
            # object moves through shared memory), never to the decode instance.
            handle = await executor.adopt.remote(
                req.request_id, pre, prefill.take_kv.remote(req.request_id))
            await decode.adopt_offloaded.remote(req, pre, p, handle, a.epochs[("executor", p)])
        else:
            tag = next(self._tags)
            await asyncio.gather(
                decode.adopt.remote(req, pre, cluster.prefill_rank(p), tag,
                                    a.epochs[("prefill", p)]),
                prefill.send_kv.remote(req.request_id, cluster.decode_rank(d), tag,
                                       tuple(pre.kv_shape), pre.kv_dtype,
                                       a.epochs[("decode", d)]))

    async def _call(self, a: Attempt, slot: tuple[str, int] | None, aw):
        """Await an actor call of the attempt; Restart if what it depends on was lost.

        A call to a dead actor (``slot``) proves that actor lost (and is reported here).
        Any other error may be a symptom of a peer's loss (a broken link) that the
        watchers report a moment later, so wait a few seconds for them.
        """
        try:
            return await a.until_lost(aw)
        except (InvalidRequestError, Restart):
            raise
        except Exception as e:
            if isinstance(e, ray.exceptions.RayActorError) and slot is not None:
                self.supervisor.report_actor(a.gen, *slot, a.epochs.get(slot, 0),
                                             f"{slot[0]} {slot[1]} died ({type(e).__name__})")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while not a.lost.is_set() and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if a.lost.is_set():
                raise Restart() from e
            raise

    @staticmethod
    def _record_prefix(load, p: int, req: GenerateRequest, pre) -> None:
        """Prefill p now holds the prompt's full blocks, less what its step evicted."""
        if load.prefill_prefix:
            index = load.prefill_prefix[p]
            index.remove(pre.evicted_hashes)
            index.add(load.prompt_block_hashes(req))

    def _cluster_lost(self) -> None:
        """Supervisor: the cluster is gone. Stop its pollers, stop every attempt on it."""
        for t in self._pollers.values():
            t.cancel()  # first: no delta of the lost cluster may follow the sentinel
        self._pollers = {}
        for a in self._attempts.values():
            a.lose()
        for q in self._streams.values():  # also the requests between two attempts
            q.put_nowait(Control.RESTART)
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
        for a in self._attempts.values():
            if a.depends_on(role, i):
                a.lose()
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

    def _start_pollers(self) -> None:
        # Detached from the request that happens to start them: a request's end or
        # cancellation must not cancel the pollers' calls.
        gen = self.supervisor.generation
        for j in range(len(self.cluster.decode)):
            running = self._pollers.get(j)
            if (running is None or running.done()) and self.supervisor.is_current(
                    "decode", j, self.cluster.epoch("decode", j)):
                self._pollers[j] = detached(self._poll(gen, j, self.cluster.epoch("decode", j),
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
                a = self._attempts.get(delta.request_id)
                if a is not None:
                    a.queue.put_nowait(delta)
