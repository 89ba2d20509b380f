"""Placement policy interface: where a request's prefill and decode run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from adrenaline.config import ConfigError
from adrenaline.engine.block_hash import block_hashes
from adrenaline.policy.prefix import PrefixIndex, choose_prefill
from adrenaline.protocol import GenerateRequest


@dataclass
class ClusterLoad:
    """The router's live view of its instances (updated as requests start and end).

    ``decode_reserved_tokens[i]`` sums prompt + max_tokens of requests placed on
    decode instance i and not finished, each rounded up to whole KV blocks
    (``footprint``): the pool they may come to hold.
    ``decode_mean_tokens[i]`` sums the same requests' KV averaged over their lives
    (prompt + max_tokens / 2, ``life_mean_tokens``): in steady state, with requests at
    every stage of their lives, the KV a decode step's attention reads. Capacity rules use
    the reserved sums (KV must fit at its maximum); time rules use the mean sums (a
    request's TPOT is the mean of the steps over its life). Likewise for executors.
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
    decode_mean_tokens: list[int] = field(default_factory=list)  # empty: as reserved
    executor_mean_tokens: list[int] = field(default_factory=list)
    # KV is held in whole blocks of this many tokens: a request of n tokens takes
    # ``footprint(n)`` of a pool, and the reserved sums count footprints.
    block_size: int = 1
    # Prefix caching on the prefill instances (empty when it is off there): what each
    # holds (policy/prefix.py), and the uncached prompt tokens placed on each and not
    # yet prefilled (the work queued there).
    prefill_prefix: list[PrefixIndex] = field(default_factory=list)
    prefill_queued_tokens: list[int] = field(default_factory=list)

    def prompt_block_hashes(self, req: GenerateRequest) -> list[int]:
        """The prompt's full-block hashes, as the prefill instances key their caches."""
        if not self.prefill_prefix:
            return []
        return block_hashes(req.prompt_token_ids, self.prefill_prefix[0].block_size)

    def cached_prefix_tokens(self, req: GenerateRequest) -> list[int]:
        """Per prefill instance: prompt tokens it holds cached, by the router's record
        (all zeros when prefix caching is off). At most prompt - 1: one is always computed."""
        n_p = len(self.prefill_inflight)
        if not self.prefill_prefix:
            return [0] * n_p
        hashes = self.prompt_block_hashes(req)
        bs = self.prefill_prefix[0].block_size
        cap = len(req.prompt_token_ids) - 1
        return [min(idx.match(hashes) * bs, cap // bs * bs) for idx in self.prefill_prefix]

    def footprint(self, tokens: int) -> int:
        """Pool tokens a request of ``tokens`` KV tokens occupies: whole blocks."""
        return -(-tokens // self.block_size) * self.block_size

    def executor_fits(self, i: int, tokens: int) -> bool:
        return (bool(self.executor_capacity_tokens)
                and self.executor_reserved_tokens[i] + self.footprint(tokens)
                <= self.executor_capacity_tokens[i])

    def decode_fits(self, d: int, tokens: int) -> bool:
        return (self.decode_reserved_tokens[d] + self.footprint(tokens)
                <= self.decode_capacity_tokens[d])

    def decode_attention_tokens(self, d: int) -> int:
        """The KV a step of decode instance ``d`` reads locally, on average (time rules)."""
        return (self.decode_mean_tokens or self.decode_reserved_tokens)[d]

    def executor_attention_tokens(self, p: int) -> int:
        return (self.executor_mean_tokens or self.executor_reserved_tokens)[p]


def life_mean_tokens(prompt_tokens: int, max_tokens: int) -> int:
    """A request's KV averaged over its life: its prompt and half its maximum output."""
    return prompt_tokens + max_tokens // 2


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

    ``options`` come from the app args' ``policy_options``; ``profile`` is what the
    cluster measured at start-up (policy/profile.py), given to a policy whose class sets
    ``needs_profile`` (None otherwise: the profile costs start-up time).

    Placement by prefix is part of the interface: ``prefer_cached_prefill`` turns a
    policy's own prefill choice into the instance that already holds the longest
    cached prefix of the prompt, under the balance rule of policy/prefix.py. Every
    built-in policy calls it; options ``prefix_placement`` (default true) and
    ``prefix_balance`` (default 1.0) tune it.
    """

    needs_profile: bool = False

    def __init__(self, options: dict | None = None, profile=None):
        self.options = dict(options or {})
        self.profile = profile
        self.prefix_placement = bool(self.options.pop("prefix_placement", True))
        self.prefix_balance = float(self.options.pop("prefix_balance", 1.0))
        if self.prefix_balance < 0:
            raise ConfigError(f"policy_options.prefix_balance: must be >= 0, "
                              f"got {self.prefix_balance}")

    def prefer_cached_prefill(self, req: GenerateRequest, load: ClusterLoad, default: int,
                              candidates: list[int] | None = None) -> int:
        """``default`` (the policy's own choice), or, by the balance rule, the instance
        (among ``candidates``) holding the longest cached prefix of the prompt."""
        if not self.prefix_placement or not load.prefill_prefix:
            return default
        return choose_prefill(len(req.prompt_token_ids), load.cached_prefix_tokens(req),
                              load.prefill_queued_tokens, default, self.prefix_balance,
                              candidates)

    @abstractmethod
    def place(self, req: GenerateRequest, load: ClusterLoad) -> Placement: ...

    def observe_decode_steps(self, decode: int, num_steps: int, step_time_s: float,
                             batch_size_sum: int, local_kv_tokens_sum: int) -> None:
        """A decode instance's served steps (cumulative counters, policy/step_feedback.py),
        for a policy that corrects its step model by them; the default ignores them."""

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

    @staticmethod
    def request_mean_tokens(req: GenerateRequest) -> int:
        """KV tokens the request holds on average over its life (``life_mean_tokens``)."""
        return life_mean_tokens(len(req.prompt_token_ids), req.params.max_tokens)


def least_loaded(load: ClusterLoad) -> tuple[int, int]:
    """(prefill, decode): fewest in-flight prefills; the decode with the most KV headroom."""
    prefill = min(range(len(load.prefill_inflight)), key=lambda i: (load.prefill_inflight[i], i))

    def headroom(i: int) -> float:
        cap = load.decode_capacity_tokens[i] if load.decode_capacity_tokens else 1
        pending = load.decode_pending_tokens[i] if load.decode_pending_tokens else 0
        return (cap - load.decode_reserved_tokens[i] - pending) / cap

    decode = max(range(len(load.decode_active)), key=lambda i: (headroom(i), -i))
    return prefill, decode
