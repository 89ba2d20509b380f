"""The discrete-event loop: arrivals, prefill steps, handoffs, decode steps, in simulated time.

Events run in time order (ties in the order they were scheduled). An instance
runs one step at a time; when a step ends its results are applied at once
(tokens, finishes, admissions) and the instance asks its scheduler for the next.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace

from adrenaline.app_config import LimitsConfig
from adrenaline.engine.request import Request
from adrenaline.errors import InvalidRequestError
from adrenaline.policy import make_policy, needs_profile
from adrenaline.policy.base import life_mean_tokens
from adrenaline.policy.profile import ClusterProfile, profile_batches
from adrenaline.protocol import GenerateRequest
from adrenaline.request_length import check_request_length
from adrenaline.sampling_params import SamplingParams
from adrenaline.serve.attempt import Stage
from adrenaline.sim.cost import CostModel
from adrenaline.sim.engines import SimDecode, SimExecutor, SimPrefill
from adrenaline.sim.hardware import HardwareProfile, get_profile
from adrenaline.sim.models import ModelSpec, load_model
from adrenaline.sim.router import SimRequest, SimRouter
from adrenaline.sim.workload import SimArrival

TOKEN_PROMPT = 11  # placeholder prompt token id
MAX_TIMELINES = 4000  # requests whose every token time is kept (for ITL percentiles)


@dataclass
class SimConfig:
    """A deployment: layout, memory budgets, policy. KV budgets default from device memory."""

    model: str = "small"
    dtype: str | None = None
    hardware: str = "cpu"
    num_prefill: int = 1
    num_decode: int = 1
    executor: bool = False
    policy: str = "none"
    policy_options: dict = field(default_factory=dict)
    prefill_kv_tokens: int | None = None
    decode_kv_tokens: int | None = None
    executor_kv_tokens: int | None = None
    executor_share: float | None = None  # of the prefill device (None: the profile's default)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    link_gbs: float | None = None
    limits: LimitsConfig | None = None  # the router's admission limits (None: none)
    # The router's limits.prefill_when_admissible (also on when ``limits`` has it): wait
    # before prefill until the policy would admit to decode (policy/prefill_gate.py).
    prefill_when_admissible: bool = False
    sample_interval_s: float = 1.0
    http: bool = False  # requests come over HTTP (the profile's frontend_cores then apply)
    # Decode batches the start-up profile times (None: policy/profile.py's, as the live router).
    profile_batches: tuple[int, ...] | None = None
    exchange_layer_s: float | None = None  # what-if: the offload exchange cost per layer


def kv_budgets(cfg: SimConfig, cost: CostModel) -> tuple[int, int, int]:
    """(prefill, decode, executor) KV tokens per instance: given, or what the device holds."""
    device = cost.capacity_tokens()
    decode = cfg.decode_kv_tokens or device
    # With an executor, the prefill device's free memory is split evenly between the prefill
    # pool (prompts and prefilled requests waiting for admission) and the executor.
    prefill = cfg.prefill_kv_tokens or (device // 2 if cfg.executor else device)
    executor = 0
    if cfg.executor:
        executor = cfg.executor_kv_tokens or max(device - prefill, 0)
    return prefill, decode, executor


def startup_profile(cost: CostModel, decode_tokens: list[int], executor_tokens: list[int],
                    batches: list[int] | tuple[int, ...]) -> ClusterProfile:
    """What actors/cluster_profile.py measures at start-up, from the cost model: the decode
    step without attention at the profiled batches, the attention seconds per KV token of
    decode and executor, the exchange, and the KV capacities."""
    seen = cost.hw.profiled_attention_ratio  # what the start-up profile's timing sees
    return ClusterProfile(base_step_s={b: cost.decode_s(b, 0) for b in batches},
                          decode_attn_s_per_token=[cost.kv_tok_s * seen] * len(decode_tokens),
                          executor_attn_s_per_token=[cost.exec_kv_tok_s * seen]
                          * len(executor_tokens),
                          exchange_s=cost.exchange_s,
                          decode_capacity_tokens=list(decode_tokens),
                          executor_capacity_tokens=list(executor_tokens),
                          kv_bytes_per_token=cost.kv_bytes)


class Simulation:
    def __init__(self, cfg: SimConfig, model: ModelSpec | None = None,
                 hw: HardwareProfile | None = None):
        self.cfg = cfg
        self.model = model or load_model(cfg.model, cfg.dtype)
        hw = hw or get_profile(cfg.hardware)
        if cfg.link_gbs:
            hw = replace(hw, link_gbs=cfg.link_gbs)
        if cfg.exchange_layer_s is not None:
            hw = replace(hw, exchange_layer_s=cfg.exchange_layer_s)
        self.hw = hw
        share = cfg.executor_share if cfg.executor_share is not None else hw.default_executor_share
        self.cost = CostModel(self.model, hw, share)
        pre_kv, dec_kv, exe_kv = kv_budgets(cfg, self.cost)
        bs, seqs, batched = cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens
        self.prefill = [SimPrefill(i, pre_kv, bs, seqs, batched) for i in range(cfg.num_prefill)]
        self.decode = [SimDecode(j, dec_kv, bs, seqs, batched) for j in range(cfg.num_decode)]
        self.executors = ([SimExecutor(i, exe_kv, bs) for i in range(cfg.num_prefill)]
                          if cfg.executor else [])
        dec_cap = [d.bm.num_blocks * bs for d in self.decode]
        exe_cap = [e.capacity_tokens for e in self.executors]
        self.max_model_len = self.model.config.max_position_embeddings
        self.max_request_tokens = min([p.bm.num_blocks * bs for p in self.prefill] + dec_cap
                                      + [self.max_model_len])
        profile = (startup_profile(self.cost, dec_cap, exe_cap,
                                   cfg.profile_batches or profile_batches(cfg.max_num_seqs))
                   if needs_profile(cfg.policy) else None)
        self.policy = make_policy(cfg.policy, cfg.policy_options, profile)
        gate = cfg.prefill_when_admissible or bool(cfg.limits
                                                    and cfg.limits.prefill_when_admissible)
        self.router = SimRouter(self.policy, cfg.num_prefill, dec_cap, exe_cap, cfg.block_size,
                                prefill_when_admissible=gate)
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.requests: list[SimRequest] = []
        self.num_refused = 0
        self.num_rejected = 0  # longer than an instance can hold (the router's 400)
        self.samples: list[dict] = []
        self._ongoing = 0
        self._queued = 0
        self._cap_queue: list[SimArrival] = []
        self._unfinished = self._total = 0

    # -- event plumbing
    def _at(self, t: float, fn, arg=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def run(self, arrivals: list[SimArrival], max_concurrency: int | None = None) -> Simulation:
        self._cap = max_concurrency
        self._unfinished = self._total = len(arrivals)
        if max_concurrency:
            self._cap_queue = list(reversed(arrivals))
            for _ in range(min(max_concurrency, len(arrivals))):
                self._at(0.0, self._arrive, self._cap_queue.pop())
        else:
            for a in arrivals:
                self._at(a.arrival_s, self._arrive, a)
        if self.cfg.sample_interval_s > 0:
            self._at(0.0, self._sample)
        heap = self._heap
        while heap:
            t, _, fn, arg = heapq.heappop(heap)
            self.now = t
            fn(arg)
        return self

    def _next_capped(self) -> None:
        if self._cap and self._cap_queue:
            self._at(self.now, self._arrive, self._cap_queue.pop())

    # -- arrival and placement
    def _arrive(self, a: SimArrival) -> None:
        n = len(self.requests)
        rid = f"sim-{n}"
        prompt = [TOKEN_PROMPT] * a.prompt_len
        params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
        sr = SimRequest(GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params),
                        Request(rid, prompt, params, arrival=n), a.arrival_s if not self._cap
                        else self.now, a.prompt_len + a.output_len,
                        life_mean_tokens(a.prompt_len, a.output_len))
        sr.req.end_len = a.prompt_len + a.output_len  # see engines.run_plan
        sr.req.sim = sr
        self.requests.append(sr)
        if n % max(1, self._total // MAX_TIMELINES) == 0:
            sr.token_times = []
        try:
            if a.prompt_len < 1:
                raise InvalidRequestError("prompt is empty")
            check_request_length(a.prompt_len, a.output_len, self.max_model_len,
                                 self.max_request_tokens)
        except InvalidRequestError:
            self.num_rejected += 1
            return self._ended(sr)
        limits = self.cfg.limits
        if limits is not None and limits.refusal(self._ongoing, self._queued) is not None:
            self.num_refused += 1
            return self._ended(sr)
        self._ongoing += 1
        self._queued += 1
        self.router.place(sr)
        if self.router.enter_gate(sr):  # else it waits at the prefill gate (WAITING)
            self._start_prefill(sr)

    def _start_prefill(self, sr: SimRequest) -> None:
        p = sr.where.prefill
        self.prefill[p].scheduler.add(sr.req)
        self._kick_prefill(p)

    def _start_gated(self) -> None:
        """Start the prefills of the requests that passed the gate meanwhile, in order."""
        passed, self.router.gate_passed = self.router.gate_passed, []
        for sr in passed:
            self._start_prefill(sr)

    # -- prefill
    def _kick_prefill(self, p: int) -> None:
        def duration(plan) -> float:
            busy_exec = bool(self.executors) and self.executors[p].kv_tokens > 0
            for req in plan.requests:
                req.sim.stage = Stage.PREFILLING
            return self.cost.prefill_s(plan.query_lens, plan.context_lens, busy_exec)

        self._kick(self.prefill[p], duration, self._prefill_done, p)

    def _prefill_done(self, arg) -> None:
        p, plan, _ = arg
        inst = self.prefill[p]
        inst.busy = False
        inst.finish_step(plan)
        for req in plan.requests:
            sr = req.sim
            sr.first_token_s = self.now
            if sr.token_times is not None:
                sr.token_times.append(self.now)
            self.router.prefilled(sr)
            if req.finish_reason is not None:  # one token: done at prefill
                admitted = self.router.release(sr)  # (a gate reservation frees capacity)
                self._queued -= 1
                self._finish(sr)
            else:
                admitted = self.router.admit_prefilled(sr)
            for w in admitted:
                self._handoff(w)
        self._kick_prefill(p)
        self._start_gated()

    # -- admission and handoff
    def _handoff(self, sr: SimRequest) -> None:
        self._queued -= 1
        sr.admitted_s = self.now
        d = sr.decision
        req = sr.req
        self.prefill[d.prefill].release(req)  # export frees the prefill blocks at once
        if sr.offloaded:
            req.executor = d.prefill
            self.executors[d.prefill].adopt(req)
            dur = self.hw.handoff_latency_s  # same device: no link
        else:
            dur = self.cost.handoff_s(req.num_computed)
        self._at(self.now + dur, self._handoff_done, sr)
        self._kick_prefill(d.prefill)

    def _handoff_done(self, sr: SimRequest) -> None:
        self.decode[sr.decision.decode].parked.append(sr.req)
        self._kick_decode(sr.decision.decode)

    # -- decode
    def _kick_decode(self, j: int) -> None:
        inst = self.decode[j]
        self._kick(inst, lambda plan: inst.step_time(plan, self.cost), self._decode_done, j)

    def _kick(self, inst, duration, done, index: int) -> None:
        """Start instance ``inst``'s next step, unless it is busy or has nothing to run;
        ``done((index, plan, seconds))`` runs when the step ends."""
        if inst.busy:
            return
        plan = inst.next_step()
        if plan is None:
            return
        inst.busy = True
        dur = duration(plan) * self._sharing()
        self._at(self.now + dur, done, (index, plan, dur))

    def _sharing(self) -> float:
        """Shared cores: how much longer a step starting now takes (1 on dedicated devices)."""
        cores = self.hw.cores
        if not cores:
            return 1.0
        busy = (sum(p.busy for p in self.prefill) + sum(d.busy for d in self.decode)
                + sum(e.kv_tokens > 0 for e in self.executors))
        if self.cfg.http and self._ongoing:
            busy += self.hw.frontend_cores
        return max(1.0, busy / cores)

    def _decode_done(self, arg) -> None:
        j, plan, dur = arg
        inst = self.decode[j]
        inst.busy = False
        done = inst.finish_step(plan, self.executors, dur, self.now)
        # What the live router passes on from each decode heartbeat (serve/router.py).
        self.policy.observe_decode_steps(j, inst.num_steps, inst.step_time_s, inst.batch_sum,
                                         inst.local_kv_sum)
        admitted = []
        for req in done:
            sr = req.sim
            if req.executor is not None:
                self.executors[req.executor].free(req)
            admitted += self.router.release(sr)
            self._finish(sr)
        for w in admitted:
            self._handoff(w)
        self._start_gated()
        self._kick_decode(j)

    def _finish(self, sr: SimRequest) -> None:
        self._ongoing -= 1
        self._ended(sr)

    def _ended(self, sr: SimRequest) -> None:
        sr.end_s = self.now
        sr.n_out = sr.req.num_output_tokens
        sr.greq = GenerateRequest(request_id=sr.greq.request_id, prompt_token_ids=[],
                                  params=sr.greq.params)  # drop the token lists
        sr.req.token_ids = []
        sr.req.sim = None  # no cycle: the request list is what stays
        self._unfinished -= 1
        self._next_capped()

    # -- use over time
    def _sample(self, _=None) -> None:
        def use(bm) -> float:
            return bm.num_used_blocks / bm.num_blocks

        s = {"t": self.now, "offloaded": self.router.num_offloaded,
             "placed": self.router.num_placed}
        s["kv_use"] = {**{f"prefill{i}": use(p.bm) for i, p in enumerate(self.prefill)},
                       **{f"decode{j}": use(d.bm) for j, d in enumerate(self.decode)},
                       **{f"executor{i}": use(e.bm) for i, e in enumerate(self.executors)}}
        s["executor_read_bytes"] = sum(d.kv_read_bytes for d in self.decode)
        s["decode_batch"] = {f"decode{j}": len(d.scheduler.running)
                             for j, d in enumerate(self.decode)}
        self.samples.append(s)
        if self._unfinished > 0 and self._heap:  # (an empty heap with work left: stuck)
            self._at(self.now + self.cfg.sample_interval_s, self._sample)


