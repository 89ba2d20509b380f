"""In-process state of one request inside an engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from adrenaline.engine.grammar import GrammarState
from adrenaline.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill; holds no KV blocks
    RUNNING = "running"  # KV for all but its last token is cached; decoding
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: a request is itself, not its field values
class Request:
    """A sequence being generated.

    Invariants: ``token_ids`` = prompt + generated; while RUNNING, KV is cached
    for ``num_computed`` = len(token_ids) - 1 tokens, and the last token is the
    next step's input. A preempted request drops its blocks and is prefilled
    again over all its tokens (recompute), so ``num_computed`` returns to 0.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # FCFS order; lower is older
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # of its latest prefill, tokens whose KV came from the prefix cache
    # Offloaded: decode attention (and all KV) lives on attention executor ``executor``,
    # which knows the request as ``remote_handle``; this engine holds no blocks for it.
    executor: int | None = None
    remote_handle: int = -1
    # Structured output: the grammar's state over the output tokens (engine/grammar.py).
    grammar: GrammarState | None = None
    # Prefill of an n-choice request: the choices, sampled from this request's logits and
    # sharing its KV blocks (see EngineCore.prefill_step); this one is never sampled itself.
    choices: list[Request] | None = None
    # With params.prompt_logprobs, set by its prefill (engine/prompt_logprobs.py): per prompt
    # token, its logprob and the top-k (None for the first), and its rank in the vocabulary.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_offloaded(self) -> bool:
        return self.executor is not None

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def resume(self, output_token_ids: list[int]) -> None:
        """Continue after ``output_token_ids`` were generated already (a recovery rerun):
        they count as output (max_tokens, min_tokens, penalties, grammar), not as prompt."""
        self.token_ids.extend(output_token_ids)
        if self.logprobs is not None:  # their logprobs were reported by the earlier attempt
            self.logprobs.extend({} for _ in output_token_ids)

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        p = self.params
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if self.grammar is not None and self.grammar.terminated:
            self.finish_reason = "stop"
        elif not p.ignore_eos and token_id in self.eos_token_ids:
            self.finish_reason = "stop"
        elif token_id in p.stop_token_ids:
            self.finish_reason = "stop"
        elif self.num_output_tokens >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"


def sampled_requests(requests: list[Request]) -> list[Request]:
    """The requests a step samples a token for, in order: an n-choice request's choices in
    its place."""
    out: list[Request] = []
    for r in requests:
        out.extend(r.choices or (r,))
    return out
