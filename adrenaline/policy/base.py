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


@dataclass(frozen=True)
class Placement:
    prefill: int
    decode: int


class PlacementPolicy(ABC):
    """Contract: ``place`` returns valid instance indices and never mutates ``load``."""

    @abstractmethod
    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement: ...
