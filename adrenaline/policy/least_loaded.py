"""Plain PD disaggregation (the baseline, also named "none"): never offloads."""

from __future__ import annotations

from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy, least_loaded
from adrenaline.protocol import GenerateRequest


class LeastLoaded(PlacementPolicy):
    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement:
        prefill, decode = least_loaded(load)
        return Placement(prefill=self.prefer_cached_prefill(req, load, prefill), decode=decode)
