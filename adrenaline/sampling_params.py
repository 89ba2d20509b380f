"""SamplingParams and RequestOutput: the public request and result types."""

from __future__ import annotations

import msgspec

from adrenaline.errors import InvalidRequestError


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one request. temperature 0 is greedy.

    ``logprobs=N`` returns, per generated token, the log-probabilities of the
    N most likely tokens plus the sampled one (computed from the raw model
    distribution, before temperature and filtering).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestOutput(msgspec.Struct, kw_only=True):
    """The result (or, while streaming, the state so far) of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # "length" | "stop" once finished
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
