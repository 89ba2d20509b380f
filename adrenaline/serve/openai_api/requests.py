"""Requests of the OpenAI-compatible API: a raw JSON body -> a validated ``ParsedRequest``.

``parse_completion_request`` / ``parse_chat_request`` return a ``ParsedRequest`` (a
``GenerateRequest`` the router accepts) or raise ``APIError`` naming the offending field.
Invariant: a ParsedRequest always fits the model (prompt non-empty, every id in
``[0, vocab_size)``, ``prompt + max_tokens <= min(max_model_len, max_request_tokens)``) and
its SamplingParams is valid. Nothing here touches Ray or FastAPI (unit-testable).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from adrenaline.errors import InvalidRequestError
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import GenerateRequest, ModelInfo
from adrenaline.sampling_params import SamplingParams
from adrenaline.serve.openai_api.errors import APIError, bad_request

MAX_LOGPROBS = 20  # SamplingParams' bound

# ---------------------------------------------------------------------------------------------
# Request bodies. Decoded strictly (no str -> int coercion); unknown fields are checked
# before decoding (see _check_options), so these structs ignore them.


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False


class _CommonBody(msgspec.Struct, kw_only=True):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None  # accepted and ignored


class CompletionBody(_CommonBody, kw_only=True):
    prompt: str | list[Any]
    max_tokens: int | None | msgspec.UnsetType = msgspec.UNSET  # absent: 16; null: fill context
    logprobs: int | None = None


class _TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[_TextPart]
    name: str | None = None  # accepted and ignored


class ChatBody(_CommonBody, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # both absent: fill the context
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


CHAT_ROLES = ("system", "developer", "user", "assistant")

# Options we do not implement, with the values that mean "off" (accepted and ignored).
# Any other field a body struct does not declare is unsupported unless null.
_UNSUPPORTED_COMMON: dict[str, tuple] = {
    "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "stop": ([], ""), "repetition_penalty": (1,), "min_tokens": (0,), "min_p": (0,),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple] = {**_UNSUPPORTED_COMMON, "echo": (False,),
                                             "suffix": ("",)}
_UNSUPPORTED_CHAT: dict[str, tuple] = {
    **_UNSUPPORTED_COMMON, "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False), "modalities": (["text"],),
}
_HINTS = {"stop": " (stop strings); use `stop_token_ids`"}


@dataclass
class ParsedRequest:
    """A validated request plus what formatting its response needs."""

    kind: str  # "completion" | "chat"
    request: GenerateRequest
    model: str
    stream: bool
    include_usage: bool
    num_logprobs: int | None  # completions: logprobs=N; chat: top_logprobs when logprobs=true
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)


def _decode_body(body: bytes, struct: type, unsupported: dict[str, tuple]):
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise bad_request(f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:  # msgspec's nesting limit: hostile input, not a server fault
        raise bad_request("malformed JSON body: nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError as e:  # msgspec raises it for invalid UTF-8 in a string
        raise bad_request(f"malformed JSON body: invalid UTF-8: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    _check_options(obj, struct, unsupported)
    try:
        return msgspec.convert(obj, struct)
    except msgspec.ValidationError as e:
        raise _field_error(str(e)) from None


def _check_options(obj: dict, struct: type, unsupported: dict[str, tuple]) -> None:
    known = set(struct.__struct_fields__)
    for name, value in obj.items():
        if name in known or value is None:
            continue
        if name in unsupported and value in unsupported[name]:
            continue  # the option's "off" value
        raise bad_request(f"`{name}` is not supported{_HINTS.get(name, '')}", param=name)


def _field_error(msg: str) -> APIError:
    """msgspec's "Expected `int`, got `str` - at `$.max_tokens`" -> an error naming the field."""
    core, _, where = msg.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    if core.startswith("Object missing required field `"):
        missing = core.split("`")[1]
        param = f"{path}.{missing}" if path else missing
        return bad_request(f"`{param}` is required", param=param)
    param = path or None
    return bad_request(f"`{param}`: {core}" if param else core, param=param)


# ---------------------------------------------------------------------------------------------
# Validation shared by both endpoints


def _check_model(body: _CommonBody, info: ModelInfo) -> None:
    if body.model != info.name:
        raise APIError(404, f"The model `{body.model}` does not exist (this server serves "
                            f"`{info.name}`)", param="model", code="model_not_found")


def _sampling_params(body: _CommonBody, max_tokens: int, num_logprobs: int | None
                     ) -> SamplingParams:
    if body.n is not None and body.n != 1:
        raise bad_request(f"`n` must be 1 (one choice per request), got {body.n}", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not temperature >= 0 or math.isinf(temperature):
        raise bad_request(f"`temperature` must be >= 0, got {temperature}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"`top_p` must be in (0, 1], got {top_p}", param="top_p")
    top_k = -1 if body.top_k in (None, 0) else body.top_k
    if top_k < -1:
        raise bad_request(f"`top_k` must be -1 or 0 (off) or >= 1, got {top_k}", param="top_k")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=body.seed,
                              stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=bool(body.ignore_eos), logprobs=num_logprobs)
    except InvalidRequestError as e:  # a bound the checks above do not cover
        raise bad_request(str(e)) from None


def _check_prompt_ids(ids: list[int], info: ModelInfo) -> None:
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise bad_request(f"prompt token id(s) {bad[:5]} outside the vocabulary "
                          f"[0, {info.vocab_size})", param="prompt")


def _resolve_max_tokens(n_prompt: int, requested: int | None, param: str, info: ModelInfo,
                        prompt_param: str) -> int:
    """The request's max_tokens; None means "whatever room is left" (at least 1)."""
    if requested is not None and requested <= 0:
        raise bad_request(f"`{param}` must be >= 1, got {requested}", param=param)
    if n_prompt >= info.max_model_len:
        raise bad_request(f"the prompt has {n_prompt} tokens; the model's context is "
                          f"{info.max_model_len} tokens and at least one must be generated",
                          param=prompt_param, code="context_length_exceeded")
    if n_prompt >= info.max_request_tokens:
        raise bad_request(f"the prompt has {n_prompt} tokens; a request may use at most "
                          f"{info.max_request_tokens} tokens (prompt + max_tokens) of KV cache",
                          param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(info.max_model_len, info.max_request_tokens) - n_prompt
    if n_prompt + requested > info.max_model_len:
        raise bad_request(f"this model's maximum context length is {info.max_model_len} tokens; "
                          f"you requested {n_prompt + requested} ({n_prompt} in the prompt, "
                          f"{requested} in `{param}`)", param=param,
                          code="context_length_exceeded")
    if n_prompt + requested > info.max_request_tokens:
        raise bad_request(f"a request may use at most {info.max_request_tokens} tokens of KV "
                          f"cache; you requested {n_prompt + requested} ({n_prompt} in the "
                          f"prompt, {requested} in `{param}`)", param=param,
                          code="context_length_exceeded")
    return requested


def _need_tokenizer(tokenizer: Tokenizer | None, info: ModelInfo, what: str,
                    param: str) -> Tokenizer:
    if tokenizer is None:
        raise bad_request(f"model `{info.name}` has no tokenizer.json: {what}", param=param)
    return tokenizer


def _stream_flags(body: _CommonBody) -> tuple[bool, bool]:
    stream = bool(body.stream)
    include_usage = stream and body.stream_options is not None and bool(
        body.stream_options.include_usage)
    return stream, include_usage


# ---------------------------------------------------------------------------------------------
# /v1/completions


def prompt_token_ids(prompt: str | list, info: ModelInfo, tokenizer: Tokenizer | None
                     ) -> list[int]:
    """A completions ``prompt`` -> token ids: a string, a list of ids, or a one-element list of
    either. Several prompts (a batch) are rejected."""
    if isinstance(prompt, list) and prompt and not _is_id_list(prompt):
        if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request("batched prompts are not supported: send one prompt per request",
                              param="prompt")
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        else:
            raise bad_request("`prompt` must be a string, a list of token ids, or a list "
                              "holding one of those", param="prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        tok = _need_tokenizer(tokenizer, info, "pass the prompt as token ids", "prompt")
        return tok.encode(prompt)
    if not _is_id_list(prompt):
        raise bad_request("`prompt` must be a string, a list of token ids, or a list "
                          "holding one of those", param="prompt")
    return list(prompt)


def _is_id_list(x: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion_request(body: bytes, info: ModelInfo, tokenizer: Tokenizer | None
                             ) -> ParsedRequest:
    req = _decode_body(body, CompletionBody, _UNSUPPORTED_COMPLETION)
    _check_model(req, info)
    ids = prompt_token_ids(req.prompt, info, tokenizer)
    _check_prompt_ids(ids, info)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"`logprobs` must be in [0, {MAX_LOGPROBS}], got {req.logprobs}",
                          param="logprobs")
    requested = 16 if req.max_tokens is msgspec.UNSET else req.max_tokens
    max_tokens = _resolve_max_tokens(len(ids), requested, "max_tokens", info, "prompt")
    params = _sampling_params(req, max_tokens, req.logprobs)
    stream, include_usage = _stream_flags(req)
    gen = GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}", prompt_token_ids=ids,
                          params=params)
    return ParsedRequest(kind="completion", request=gen, model=info.name, stream=stream,
                         include_usage=include_usage, num_logprobs=req.logprobs)


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


def chat_prompt_ids(messages: list[ChatMessage], info: ModelInfo, tokenizer: Tokenizer | None
                    ) -> list[int]:
    """Render the chat template (with the generation prompt) and encode it.

    The BOS token is added by ``encode`` unless the template already wrote it.
    """
    if not messages:
        raise bad_request("`messages` is empty", param="messages")
    plain: list[dict] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"`messages[{i}].role` must be one of {', '.join(CHAT_ROLES)}, "
                              f"got {m.role!r}", param=f"messages[{i}].role")
        if isinstance(m.content, str):
            content = m.content
        else:
            if any(p.type != "text" for p in m.content):
                raise bad_request(f"`messages[{i}].content`: only text parts are supported",
                                  param=f"messages[{i}].content")
            content = "".join(p.text for p in m.content)
        plain.append({"role": m.role, "content": content})
    tok = _need_tokenizer(tokenizer, info, "chat completions need one", "messages")
    try:
        text = tok.apply_chat_template(plain, add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception, or a template error
        raise bad_request(f"`messages` rejected by the chat template: {e}",
                          param="messages") from None
    bos = tok.bos_token
    return tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def parse_chat_request(body: bytes, info: ModelInfo, tokenizer: Tokenizer | None
                       ) -> ParsedRequest:
    req = _decode_body(body, ChatBody, _UNSUPPORTED_CHAT)
    _check_model(req, info)
    num_logprobs: int | None = None
    if req.logprobs:
        num_logprobs = req.top_logprobs or 0
        if not 0 <= num_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"`top_logprobs` must be in [0, {MAX_LOGPROBS}], got "
                              f"{num_logprobs}", param="top_logprobs")
    elif req.top_logprobs:  # 0 without logprobs is harmless
        raise bad_request("`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
    ids = chat_prompt_ids(req.messages, info, tokenizer)
    _check_prompt_ids(ids, info)
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = _resolve_max_tokens(len(ids), requested, param, info, "messages")
    params = _sampling_params(req, max_tokens, num_logprobs)
    stream, include_usage = _stream_flags(req)
    gen = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_token_ids=ids,
                          params=params)
    return ParsedRequest(kind="chat", request=gen, model=info.name, stream=stream,
                         include_usage=include_usage, num_logprobs=num_logprobs)
