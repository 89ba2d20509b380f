"""SamplingParams and RequestOutput: the public request and result types."""

from __future__ import annotations

import math

import msgspec

from adrenaline.errors import InvalidRequestError


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one request. temperature 0 is greedy.

    ``logprobs=N`` returns, per generated token, the log-probabilities of the
    N most likely tokens plus the sampled one (computed from the raw model
    distribution, before temperature and filtering).

    The logits processors follow vLLM's semantics, applied in this order to every
    token sampled, whichever worker samples it: ``json_schema`` (structured output:
    only tokens that keep the text a prefix of a JSON value matching the schema),
    ``min_tokens`` (EOS and ``stop_token_ids`` masked until that many tokens were
    generated), ``logit_bias`` (added to the logits), ``repetition_penalty`` (tokens
    seen in the prompt or output: positive logits divided by it, negative ones
    multiplied), ``frequency_penalty`` / ``presence_penalty`` (subtracted, times the
    token's count in the output / once if it occurs there); then temperature,
    ``min_p`` (drop tokens below min_p times the top token's probability), top-k, top-p.
    ``n`` choices share one prefill; choice i of a seeded request uses seed + i.

    ``prompt_logprobs=N`` (vLLM's name) returns, per prompt token after the first, its
    log-probability given the tokens before it and the N most likely tokens there (the
    same float32 log-softmax of the raw logits as ``logprobs``). Such a prompt is
    prefilled whole: the prefix cache is not read for it (a cached prefix has no logits).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    json_schema: str | None = None  # a JSON schema, as JSON text (structured output)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError(
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if not 1 <= self.n <= 128:
            raise InvalidRequestError(f"n must be in [1, 128], got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                      f"got {self.min_tokens}")
        for tok, bias in self.logit_bias:
            if tok < 0 or not -100 <= bias <= 100:
                raise InvalidRequestError(f"logit_bias: token {tok} -> {bias}: ids must be >= 0 "
                                          "and biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def processes_logits(self) -> bool:
        """True when a logits processor (before temperature) applies to this request."""
        return bool(self.has_penalties or self.min_tokens or self.logit_bias
                    or self.json_schema is not None)

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice ``index`` of an n-choice request: n=1, seed + index."""
        seed = None if self.seed is None else self.seed + index
        return msgspec.structs.replace(self, n=1, seed=seed)


class RequestOutput(msgspec.Struct, kw_only=True):
    """The result (or, while streaming, the state so far) of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # "length" | "stop" once finished
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
