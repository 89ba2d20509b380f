"""Load-aware offloading (the paper's bound).

OB = min(OB_mem, OB_comp):
  OB_mem  = min(sum executor KV capacity / decode KV capacity,
                sum executor bandwidth   / decode bandwidth)
  OB_comp = (B_max - B_tpot) / B_tpot
B_max is the largest decode batch whose step fits the TPOT SLO (profiled);
B_tpot the batch the decode instance's own KV capacity holds at the
request's length. The decision is made at admission (after prefill, and
again whenever capacity frees): a request runs locally while the decode
instance has KV room for it; otherwise it is offloaded onto the executor
beside its prefill instance only while (a) the offloaded KV load, at every
request's maximum length, stays within OB x the decode KV capacity, (b) the
decode batch stays within B_max, and (c) the executor has room for it;
otherwise it waits. Options: ``tpot_slo_ms`` (default 200).
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
        return Placement(prefill=self.prefer_cached_prefill(req, load, prefill), decode=decode)

    def admit(self, req: GenerateRequest, where: Placement, load: ClusterLoad) -> Placement | None:
        tokens = self.request_tokens(req)
        d, p = where.decode, where.prefill
        if load.decode_fits(d, tokens):
            return Placement(prefill=p, decode=d)
        cap = load.decode_capacity_tokens[d]
        # All offloaded KV; exact with one decode instance, conservative with several.
        offloaded = sum(load.executor_reserved_tokens)
        within_ob = offloaded + tokens <= self.offload_bound(tokens, cap) * cap
        within_batch = load.decode_active[d] + 1 <= self.b_max
        if within_ob and within_batch and load.executor_fits(p, tokens):
            return Placement(prefill=p, decode=d, offload=True)
        return None
