"""Placement policy interface: where a request's prefill and decode run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from adrenaline.protocol import GenerateRequest


@dataclass
class ClusterLoad:
    """The router's live view of its instances (updated as requests start and end).

    ``decode_reserved_tokens[i]`` sums prompt + max_tokens of requests placed on
    decode instance i and not finished: the KV they may come to hold.
    """

    prefill_inflight: list[int]
    decode_active: list[int]
    decode_reserved_tokens: list[int]
    decode_capacity_tokens: list[int] = field(default_factory=list)
    # Placed on a decode instance but not admitted yet (prefilling, or waiting for room).
    decode_pending_tokens: list[int] = field(default_factory=list)
    # Attention executors (one per prefill instance; empty when offloading is off).
    executor_active: list[int] = field(default_factory=list)
    executor_reserved_tokens: list[int] = field(default_factory=list)
    executor_capacity_tokens: list[int] = field(default_factory=list)

    def executor_fits(self, i: int, tokens: int) -> bool:
        return (bool(self.executor_capacity_tokens)
                and self.executor_reserved_tokens[i] + tokens <= self.executor_capacity_tokens[i])

    def decode_fits(self, d: int, tokens: int) -> bool:
        return self.decode_reserved_tokens[d] + tokens <= self.decode_capacity_tokens[d]


@dataclass(frozen=True)
class Placement:
    """Where a request runs; ``offload`` moves its decode attention and KV onto the
    attention executor colocated with its prefill instance."""

    prefill: int
    decode: int
    offload: bool = False


class PlacementPolicy(ABC):
    """Two decisions per request, neither mutating ``load``.

    ``place`` (at arrival) picks the prefill and decode instances, and may mark
    the request for offloading; ``admit`` (after prefill, re-asked whenever
    capacity frees) says whether it runs now, locally or offloaded onto the
    executor beside its prefill instance, or must wait (None). A request is
    admitted only where its KV fits at its maximum length.

    ``options`` come from the app args' ``policy_options``; ``profile`` (optional) is
    what the cluster measured at start-up (see policy/profile.py).
    """

    def __init__(self, options: dict | None = None, profile=None):
        self.options = dict(options or {})
        self.profile = profile

    @abstractmethod
    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement: ...

    def admit(self, req: GenerateRequest, where: Placement, load: ClusterLoad) -> Placement | None:
        """Default: local once the decode instance has KV room for it."""
        tokens = self.request_tokens(req)
        if load.decode_fits(where.decode, tokens):
            return Placement(prefill=where.prefill, decode=where.decode)
        return None

    @staticmethod
    def request_tokens(req: GenerateRequest) -> int:
        """KV tokens the request may come to hold (its maximum length)."""
        return len(req.prompt_token_ids) + req.params.max_tokens


def least_loaded(load: ClusterLoad) -> tuple[int, int]:
    """(prefill, decode): fewest in-flight prefills; the decode with the most KV headroom."""
    prefill = min(range(len(load.prefill_inflight)), key=lambda i: (load.prefill_inflight[i], i))

    def headroom(i: int) -> float:
        cap = load.decode_capacity_tokens[i] if load.decode_capacity_tokens else 1
        pending = load.decode_pending_tokens[i] if load.decode_pending_tokens else 0
        return (cap - load.decode_reserved_tokens[i] - pending) / cap

    decode = max(range(len(load.decode_active)), key=lambda i: (headroom(i), -i))
    return prefill, decode
