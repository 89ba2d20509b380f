"""Load-aware offloading (the paper's bound).

OB = min(OB_mem, OB_comp):
  OB_mem  = min(sum executor KV capacity / decode KV capacity,
                sum executor bandwidth   / decode bandwidth)
  OB_comp = (B_max - B_tpot) / B_tpot
B_max is the largest decode batch whose step fits the TPOT SLO (profiled);
B_tpot the batch the decode instance's own KV capacity holds at the
request's length. A request stays local while the decode instance has KV
room for it; otherwise it is offloaded only while (a) the offloaded KV load
of that decode instance, at every request's maximum length, stays within
OB x its KV capacity, (b) the decode batch stays within B_max, and (c) an
executor has room for it. Options: ``tpot_slo_ms`` (default 200).
"""

from __future__ import annotations

from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy, least_loaded
from adrenaline.protocol import GenerateRequest


class LoadAware(PlacementPolicy):
    def __init__(self, options: dict | None = None, profile=None):
        super().__init__(options, profile)
        if profile is None:
            raise ValueError("load_aware needs the cluster's start-up profile")
        self.tpot_slo_s = float(self.options.get("tpot_slo_ms", 200.0)) / 1e3
        self.b_max = profile.b_max(self.tpot_slo_s)
        dec_cap = sum(profile.decode_capacity_tokens)
        dec_bw = sum(profile.decode_bandwidth_gbs)
        self.ob_mem = min(sum(profile.executor_capacity_tokens) / dec_cap,
                          sum(profile.executor_bandwidth_gbs) / dec_bw) if dec_bw else 0.0

    def offload_bound(self, request_tokens: int, decode_capacity: int) -> float:
        b_tpot = max(decode_capacity // max(request_tokens, 1), 1)
        ob_comp = max(self.b_max - b_tpot, 0) / b_tpot
        return min(self.ob_mem, ob_comp)

    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement:
        prefill, decode = least_loaded(load)
        tokens = self.request_tokens(req)
        cap = load.decode_capacity_tokens[decode]
        if load.decode_reserved_tokens[decode] + tokens <= cap or not load.executor_capacity_tokens:
            return Placement(prefill=prefill, decode=decode)
        # All offloaded KV; exact with one decode instance, conservative with several.
        offloaded = sum(load.executor_reserved_tokens)
        within_ob = offloaded + tokens <= self.offload_bound(tokens, cap) * cap
        within_batch = load.decode_active[decode] + 1 <= self.b_max
        fits = [i for i in range(len(load.executor_capacity_tokens))
                if load.executor_fits(i, tokens)]
        if not (within_ob and within_batch and fits):
            return Placement(prefill=prefill, decode=decode)
        best = max(fits, key=lambda i: (load.executor_capacity_tokens[i]
                                        - load.executor_reserved_tokens[i], -i))
        return Placement(prefill=best, decode=decode, offload=True)
