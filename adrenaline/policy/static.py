"""Static offloading: a fixed fraction ``ratio`` of requests (0..1) is offloaded.

Requests are counted in arrival order and the k-th is offloaded when
floor(k * ratio) grows, so any prefix of the stream offloads the ratio as
closely as integers allow. A request picked for offload is prefilled beside
the executor with the most room and waits, after prefill, until that
executor can hold it at its maximum length. Placement by prefix applies to
both: a request kept local goes where its prefix is cached (balance rule of
policy/prefix.py); an offloaded one does too, among the executors with room.
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
            return Placement(prefill=self.prefer_cached_prefill(req, load, prefill), decode=decode)
        # Prefilled where its KV will stay: beside the executor with the most room, or, by
        # prefix, beside any executor that has room for it.
        n = len(load.executor_capacity_tokens)
        best = max(range(n), key=lambda i: (load.executor_capacity_tokens[i]
                                            - load.executor_reserved_tokens[i], -i))
        fits = [i for i in range(n) if load.executor_fits(i, self.request_tokens(req))]
        if fits:
            best = self.prefer_cached_prefill(req, load, best if best in fits else fits[0], fits)
        return Placement(prefill=best, decode=decode, offload=True)

    def admit(self, req: GenerateRequest, where: Placement, load: ClusterLoad) -> Placement | None:
        if not where.offload:
            return super().admit(req, where, load)
        return where if load.executor_fits(where.prefill, self.request_tokens(req)) else None
