"""Least-loaded placement: fewest in-flight prefills; decode with the most KV headroom."""

from __future__ import annotations

from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy
from adrenaline.protocol import GenerateRequest


class LeastLoaded(PlacementPolicy):
    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement:
        prefill = min(range(len(load.prefill_inflight)), key=lambda i: (load.prefill_inflight[i], i))

        def headroom(i: int) -> float:
            cap = load.decode_capacity_tokens[i] if load.decode_capacity_tokens else 1
            return (cap - load.decode_reserved_tokens[i]) / cap

        decode = max(range(len(load.decode_active)), key=lambda i: (headroom(i), -i))
        return Placement(prefill=prefill, decode=decode)
