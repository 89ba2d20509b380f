"""The one length rule: a request's prompt plus max_tokens must fit its limits, else rejected.

``max_model_len`` is the context (positions the model takes); ``max_request_tokens`` the
KV one request may hold (the smallest pool it can land in, and the context). A request
fits when its prompt leaves room for one token and prompt + max_tokens is within both.
The OpenAI layer answers a misfit with a 400 naming the limit and the field
(``RequestTooLongError.param``); the router, the engine and the simulator reject with the
same check and the same message. Only the offline ``LLM`` resolves a max_tokens past the
context to the room left before checking (as vLLM's offline API ends such a request at
the context), as the OpenAI layer resolves an absent limit ("fill the context").
"""

from __future__ import annotations

from adrenaline.errors import InvalidRequestError


class RequestTooLongError(InvalidRequestError):
    """Prompt (+ max_tokens) beyond a limit; ``param`` names the field: "prompt" or
    "max_tokens" (or the name the caller gave them)."""

    def __init__(self, message: str, param: str = "max_tokens"):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # crosses Ray processes with its field
        return (RequestTooLongError, (str(self), self.param))


def check_request_length(n_prompt: int, max_tokens: int, max_model_len: int,
                         max_request_tokens: int, *, param: str = "max_tokens",
                         prompt_param: str = "prompt") -> None:
    """Raise RequestTooLongError unless ``n_prompt`` + ``max_tokens`` fits both limits."""
    if n_prompt >= max_model_len:
        raise RequestTooLongError(
            f"the prompt has {n_prompt} tokens; the model's context is {max_model_len} "
            "tokens and at least one must be generated", prompt_param)
    if n_prompt >= max_request_tokens:
        raise RequestTooLongError(
            f"the prompt has {n_prompt} tokens; a request may use at most "
            f"{max_request_tokens} tokens (prompt + max_tokens) of KV cache", prompt_param)
    total = n_prompt + max_tokens
    if total > max_model_len:
        raise RequestTooLongError(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{total} ({n_prompt} in the prompt, {max_tokens} in `{param}`)", param)
    if total > max_request_tokens:
        raise RequestTooLongError(
            f"a request may use at most {max_request_tokens} tokens of KV cache; you "
            f"requested {total} ({n_prompt} in the prompt, {max_tokens} in `{param}`)", param)


def room_left(n_prompt: int, max_model_len: int, max_request_tokens: int) -> int:
    """The largest max_tokens that fits after ``n_prompt`` prompt tokens (may be <= 0)."""
    return min(max_model_len, max_request_tokens) - n_prompt
