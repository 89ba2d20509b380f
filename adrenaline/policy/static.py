"""Static offloading: a fixed fraction ``ratio`` of requests (0..1) is offloaded.

Requests are counted in arrival order and the k-th is offloaded when
floor(k * ratio) grows, so any prefix of the stream offloads the ratio as
closely as integers allow. A request picked for offload is prefilled beside
the executor with the most room and waits, after prefill, until that
executor can hold it at its maximum length.
"""

from __future__ import annotations

from adrenaline.config import ConfigError
from adrenaline.policy.base import ClusterLoad, Placement, PlacementPolicy, least_loaded
from adrenaline.protocol import GenerateRequest


class StaticRatio(PlacementPolicy):
    def __init__(self, options: dict | None = None, profile=None):
        super().__init__(options, profile)
        self.ratio = float(self.options.get("ratio", 0.5))
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"policy_options.ratio: must be in [0, 1], got {self.ratio}")
        self._count = 0

    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement:
        prefill, decode = least_loaded(load)
        k = self._count
        self._count += 1
        want = int((k + 1) * self.ratio) > int(k * self.ratio)
        if not want or not load.executor_capacity_tokens:
            return Placement(prefill=prefill, decode=decode)
        # Prefilled where its KV will stay: beside the executor with the most room.
        best = max(range(len(load.executor_capacity_tokens)),
                   key=lambda i: (load.executor_capacity_tokens[i]
                                  - load.executor_reserved_tokens[i], -i))
        return Placement(prefill=best, decode=decode, offload=True)

    def admit(self, req: GenerateRequest, where: Placement, load: ClusterLoad) -> Placement | None:
        if not where.offload:
            return super().admit(req, where, load)
        return where if load.executor_fits(where.prefill, self.request_tokens(req)) else None
