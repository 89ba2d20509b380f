"""Load-aware offloading: the paper's bound, with remote attention kept hidden.

From the start-up profile (policy/profile.py), for a request of T tokens at
its maximum length (T_mean averaged over its life: prompt + max_tokens / 2) on
decode instance d, beside executor p:

  OB_mem  = min(sum executor KV capacity / sum decode KV capacity,
                sum executor attention bandwidth / sum decode attention bandwidth)
  B_tpot  = max(decode capacity // T, 1)      (what d's own KV holds)
  B_max   = the largest batch whose step fits the TPOT SLO while d's attention reads
            B_tpot x T_mean local KV tokens (offloaded requests add only their
            non-attention share)
  OB_comp = (B_max - B_tpot) / B_tpot
  OB      = min(OB_mem, OB_comp)

Capacity is counted at maximum lengths (KV must fit at its longest); time at the
life means (ClusterLoad's mean sums): a request's TPOT is the mean of the steps
over its life, and in steady state the batch holds requests at every stage of
theirs, so the step's attention reads about the mean sums.

A request runs locally while d has KV room for it. Otherwise it is offloaded
onto executor p only while all of these hold, else it waits:
  (a) the offloaded KV load, at every request's maximum length, stays within
      OB x d's KV capacity;
  (b) d's batch stays within B_max at the local KV d's step reads (mean sums);
  (c) p has room for its KV;
  (d) p's share of a step's attention, its offloaded KV (mean sums, with this
      request) at p's measured attention speed plus the exchange, finishes within
      d's local attention time for the step, so remote attention stays hidden
      behind local attention and the step does not grow by waiting on p.
The step model behind B_max is the profile's, corrected by the decode instance's served
steps (policy/step_feedback.py): B_max is the largest batch whose step, times the ratio of
served to modeled steps, fits the SLO.

Options: ``tpot_slo_ms`` (default 200); ``hide_remote`` (default true): false drops rule
(d), offloading for KV capacity even where the executor's attention would make the step
wait on it; ``step_feedback`` (default true): false keeps the profile's step model as it is.

``b_max`` (shown in /metrics) is the bound of the latest offload decision.
"""

from __future__ import annotations

from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy, least_loaded
from adrenaline.policy.step_feedback import StepFeedback
from adrenaline.protocol import GenerateRequest


class LoadAware(PlacementPolicy):
    needs_profile = True

    def __init__(self, options: dict | None = None, profile=None):
        super().__init__(options, profile)
        if profile is None:
            raise ValueError("load_aware needs the cluster's start-up profile")
        self.tpot_slo_s = float(self.options.get("tpot_slo_ms", 200.0)) / 1e3
        self.hide_remote = bool(self.options.get("hide_remote", True))
        self.feedback = (StepFeedback(profile, len(profile.decode_capacity_tokens))
                         if self.options.get("step_feedback", True) else None)
        dec_cap = sum(profile.decode_capacity_tokens)
        dec_bw = sum(profile.decode_bandwidth_gbs)
        self.ob_mem = min(sum(profile.executor_capacity_tokens) / dec_cap,
                          sum(profile.executor_bandwidth_gbs) / dec_bw) if dec_bw else 0.0
        self.b_max = profile.b_max(self.tpot_slo_s, 0)  # until the first offload decision

    def observe_decode_steps(self, decode: int, num_steps: int, step_time_s: float,
                             batch_size_sum: int, local_kv_tokens_sum: int) -> None:
        if self.feedback is not None:
            self.feedback.observe(decode, num_steps, step_time_s, batch_size_sum,
                                  local_kv_tokens_sum)

    def step_scale(self, decode: int) -> float:
        """Served over modeled step time on ``decode`` (1.0 without feedback)."""
        return self.feedback.scale[decode] if self.feedback is not None else 1.0

    def _b_max(self, local_kv_tokens: int, decode: int) -> int:
        return self.profile.b_max(self.tpot_slo_s / self.step_scale(decode), local_kv_tokens,
                                  decode)

    def offload_bound(self, tokens: int, mean_tokens: int, decode_capacity: int,
                      decode: int = 0) -> float:
        """OB for requests of ``tokens`` at most, ``mean_tokens`` over their lives."""
        b_tpot = max(decode_capacity // max(tokens, 1), 1)
        b_max = self._b_max(b_tpot * mean_tokens, decode)
        ob_comp = max(b_max - b_tpot, 0) / b_tpot
        return min(self.ob_mem, ob_comp)

    def hidden(self, d: int, p: int, mean_tokens: int, load: ClusterLoad) -> bool:
        """(d) The executor's step over its offloaded KV plus this request's fits within
        the decode instance's local attention time (both at life means)."""
        remote = self.profile.remote_s(p, load.executor_attention_tokens(p) + mean_tokens)
        return remote <= self.profile.local_attention_s(load.decode_attention_tokens(d), d)

    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement:
        prefill, decode = least_loaded(load)
        return Placement(prefill=self.prefer_cached_prefill(req, load, prefill), decode=decode)

    def admit(self, req: GenerateRequest, where: Placement, load: ClusterLoad) -> Placement | None:
        tokens = self.request_tokens(req)
        d, p = where.decode, where.prefill
        if load.decode_fits(d, tokens):
            return Placement(prefill=p, decode=d)
        cap = load.decode_capacity_tokens[d]
        mean = self.request_mean_tokens(req)
        # All offloaded KV; exact with one decode instance, conservative with several.
        offloaded = sum(load.executor_reserved_tokens)
        within_ob = offloaded + tokens <= self.offload_bound(tokens, mean, cap, d) * cap
        self.b_max = self._b_max(load.decode_attention_tokens(d), d)
        within_batch = load.decode_active[d] + 1 <= self.b_max
        if (within_ob and within_batch and load.executor_fits(p, tokens)
                and (not self.hide_remote or self.hidden(d, p, mean, load))):
            return Placement(prefill=p, decode=d, offload=True)
        return None
