"""Requests of the OpenAI-compatible API: a raw JSON body -> a validated ``ParsedRequest``.

``parse_completion_request`` / ``parse_chat_request`` return a ``ParsedRequest`` (a
``GenerateRequest`` the router accepts) or raise ``APIError`` naming the offending field.
Invariant: a ParsedRequest always fits the model (prompt non-empty, every id in
``[0, vocab_size)``, ``prompt + max_tokens <= min(max_model_len, max_request_tokens)``) and
its SamplingParams is valid. Nothing here touches Ray or FastAPI (unit-testable).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from adrenaline.errors import InvalidRequestError
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import GenerateRequest, ModelInfo
from adrenaline.request_length import RequestTooLongError, check_request_length, room_left
from adrenaline.sampling_params import SamplingParams
from adrenaline.serve.openai_api.errors import APIError, bad_request
from adrenaline.serve.openai_api.tools import (ToolMode, tool_call_text, tool_mode,
                                               tools_system_text)

MAX_LOGPROBS = 20  # SamplingParams' bound

# ---------------------------------------------------------------------------------------------
# Request bodies. Decoded strictly (no str -> int coercion); unknown fields are checked
# before decoding (see _check_options), so these structs ignore them.


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = False


class JSONSchemaFormat(msgspec.Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None  # absent: any JSON object
    description: str | None = None  # accepted and ignored
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str  # "text" | "json_object" | "json_schema"
    json_schema: JSONSchemaFormat | None = None


class _CommonBody(msgspec.Struct, kw_only=True):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted and ignored
    prompt_logprobs: int | None = None  # vLLM's: each choice gets the prompt's logprobs


class CompletionBody(_CommonBody, kw_only=True):
    prompt: str | list[Any]
    max_tokens: int | None | msgspec.UnsetType = msgspec.UNSET  # absent: 16; null: fill context
    logprobs: int | None = None
    echo: bool | None = False


class _TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class ToolCall(msgspec.Struct, kw_only=True):
    id: str = ""
    type: str = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[_TextPart] | None = None
    name: str | None = None  # accepted and ignored
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDef


class _NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: _NamedFunction


class ChatBody(_CommonBody, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # both absent: fill the context
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: "required" may make several calls


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_N = 16  # choices per request

# Options we do not implement, with the values that mean "off" (accepted and ignored).
# Any other field a body struct does not declare is unsupported unless null.
_UNSUPPORTED_COMMON: dict[str, tuple] = {"best_of": (1,)}
_UNSUPPORTED_COMPLETION: dict[str, tuple] = {**_UNSUPPORTED_COMMON, "suffix": ("",)}
_UNSUPPORTED_CHAT: dict[str, tuple] = {
    **_UNSUPPORTED_COMMON, "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],),
}
_HINTS = {"functions": "; use `tools`", "function_call": "; use `tool_choice`"}


@dataclass
class ParsedRequest:
    """A validated request plus what formatting its response needs."""

    kind: str  # "completion" | "chat"
    request: GenerateRequest
    model: str
    stream: bool
    include_usage: bool
    num_logprobs: int | None  # completions: logprobs=N; chat: top_logprobs when logprobs=true
    stop: list[str] = field(default_factory=list)  # stop strings (matched on decoded text)
    echo: str | None = None  # completions' echo: the prompt's text, put before each choice
    # completions' echo with logprobs: the prompt tokens' logprobs lead each choice's
    echo_logprobs: bool = False
    echo_only: bool = False  # max_tokens 0 with echo: one token is generated, then dropped
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: its top-k
    tools: ToolMode | None = None  # chat: how tool calls are parsed from the output
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def n(self) -> int:
        return self.request.params.n

    @property
    def min_tokens(self) -> int:
        return self.request.params.min_tokens

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


def _sampling_params(body: _CommonBody, max_tokens: int, num_logprobs: int | None,
                     info: ModelInfo, json_schema: str | None = None,
                     prompt_logprobs: int | None = None) -> SamplingParams:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"`n` must be in [1, {MAX_N}], got {n}", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not temperature >= 0 or math.isinf(temperature):
        raise bad_request(f"`temperature` must be >= 0, got {temperature}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"`top_p` must be in (0, 1], got {top_p}", param="top_p")
    top_k = -1 if body.top_k in (None, 0) else body.top_k
    if top_k < -1:
        raise bad_request(f"`top_k` must be -1 or 0 (off) or >= 1, got {top_k}", param="top_k")
    _check_range(body.min_p, "min_p", 0, 1)
    _check_range(body.presence_penalty, "presence_penalty", -2, 2)
    _check_range(body.frequency_penalty, "frequency_penalty", -2, 2)
    rep = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    if not 0 < rep <= 2:
        raise bad_request(f"`repetition_penalty` must be in (0, 2], got {rep}",
                          param="repetition_penalty")
    min_tokens = body.min_tokens or 0
    if not 0 <= min_tokens <= max_tokens:
        raise bad_request(f"`min_tokens` must be in [0, max_tokens={max_tokens}], got "
                          f"{min_tokens}", param="min_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, min_p=body.min_p or 0.0, seed=body.seed,
                              stop_token_ids=tuple(body.stop_token_ids or ()),
                              ignore_eos=bool(body.ignore_eos), logprobs=num_logprobs, n=n,
                              presence_penalty=body.presence_penalty or 0.0,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              repetition_penalty=rep, min_tokens=min_tokens,
                              logit_bias=_logit_bias(body.logit_bias, info),
                              json_schema=json_schema, prompt_logprobs=prompt_logprobs)
    except InvalidRequestError as e:  # a bound the checks above do not cover
        raise bad_request(str(e)) from None


def _check_range(value: float | None, param: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"`{param}` must be in [{lo}, {hi}], got {value}", param=param)


def _logit_bias(bias: dict[str, float] | None, info: ModelInfo) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> (id, bias) pairs; ids in the vocabulary, bias in
    [-100, 100]."""
    out = []
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise bad_request(f"`logit_bias` keys must be token ids, got {key!r}",
                              param="logit_bias") from None
        if not 0 <= tok < info.vocab_size:
            raise bad_request(f"`logit_bias`: token id {tok} outside the vocabulary "
                              f"[0, {info.vocab_size})", param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"`logit_bias`: bias {value} for token {tok} outside [-100, 100]",
                              param="logit_bias")
        out.append((tok, float(value)))
    return tuple(out)


def _stop_strings(body: _CommonBody) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop = [s for s in stop if s]  # "" would match everywhere: it means no stop string
    if len(stop) > MAX_STOP:
        raise bad_request(f"`stop` takes at most {MAX_STOP} strings, got {len(stop)}",
                          param="stop")
    return stop


def _response_format_schema(body: _CommonBody) -> str | None:
    """``response_format`` -> the JSON schema (as text) the output must match, or None."""
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json.dumps({"type": "object"})
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("`response_format.json_schema` is required for type json_schema",
                              param="response_format.json_schema")
        return json.dumps(rf.json_schema.schema or {"type": "object"}, sort_keys=True)
    raise bad_request(f"`response_format.type` must be text, json_object or json_schema, got "
                      f"{rf.type!r}", param="response_format.type")


def _check_prompt_ids(ids: list[int], info: ModelInfo) -> None:
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise bad_request(f"prompt token id(s) {bad[:5]} outside the vocabulary "
                          f"[0, {info.vocab_size})", param="prompt")


def _resolve_max_tokens(n_prompt: int, requested: int | None, param: str, info: ModelInfo,
                        prompt_param: str, echo: bool = False) -> int:
    """The request's max_tokens; None means "whatever room is left" (at least 1). With
    ``echo``, 0 is allowed (scoring the prompt only); the engine then generates one token."""
    if requested is not None and requested <= 0:
        if echo and requested == 0:
            requested = 1
        else:
            raise bad_request(f"`{param}` must be >= 1{' (0 only with `echo`)' if not echo else ''}"
                              f", got {requested}", param=param)
    if requested is None:
        requested = max(1, room_left(n_prompt, info.max_model_len, info.max_request_tokens))
    try:
        check_request_length(n_prompt, requested, info.max_model_len, info.max_request_tokens,
                             param=param, prompt_param=prompt_param)
    except RequestTooLongError as e:
        raise bad_request(str(e), param=e.param, code="context_length_exceeded") from None
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


def split_prompts(prompt: str | list, max_prompts: int) -> list[str | list]:
    """A completions ``prompt`` -> its prompts: a string or a list of ids is one; a list of
    strings or of id lists is several (at most ``max_prompts``, the
    ``limits.max_prompts_per_request``)."""
    if not isinstance(prompt, list) or not prompt or _is_id_list(prompt):
        return [prompt]
    if not all(isinstance(p, str) for p in prompt) and not all(
            isinstance(p, list) for p in prompt):
        raise bad_request("`prompt` must be a string, a list of token ids, or a list of "
                          "strings or of token-id lists", param="prompt")
    if len(prompt) > max_prompts:
        raise bad_request(f"`prompt` holds {len(prompt)} prompts; the limit is {max_prompts} "
                          "per request (limits.max_prompts_per_request)", param="prompt",
                          code="too_many_prompts")
    return list(prompt)


def prompt_token_ids(prompt: str | list, info: ModelInfo, tokenizer: Tokenizer | None
                     ) -> list[int]:
    """One completions prompt -> token ids: a string or a list of ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        tok = _need_tokenizer(tokenizer, info, "pass the prompt as token ids", "prompt")
        return tok.encode(prompt)
    if not isinstance(prompt, list) or not _is_id_list(prompt):
        raise bad_request("`prompt` must be a string, a list of token ids, or a list of "
                          "strings or of token-id lists", param="prompt")
    return list(prompt)


def _is_id_list(x: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _check_prompt_logprobs(value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"`prompt_logprobs` must be in [0, {MAX_LOGPROBS}], got {value}",
                          param="prompt_logprobs")


def parse_completion_request(body: bytes, info: ModelInfo, tokenizer: Tokenizer | None,
                             max_prompts: int = 64) -> ParsedRequest | list[ParsedRequest]:
    """One ParsedRequest per prompt: the request itself when it holds one prompt, else the
    list (see openai_api/batch.py; ids ``<id>-<i>``, one ``created``)."""
    req = _decode_body(body, CompletionBody, _UNSUPPORTED_COMPLETION)
    _check_model(req, info)
    prompts = split_prompts(req.prompt, max_prompts)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"`logprobs` must be in [0, {MAX_LOGPROBS}], got {req.logprobs}",
                          param="logprobs")
    _check_prompt_logprobs(req.prompt_logprobs)
    echo_logprobs = bool(req.echo) and req.logprobs is not None
    # The engine computes the larger of the two top-k's; each use keeps its own.
    wanted = [k for k in (req.logprobs if echo_logprobs else None, req.prompt_logprobs)
              if k is not None]
    prompt_k = max(wanted) if wanted else None
    requested = 16 if req.max_tokens is msgspec.UNSET else req.max_tokens
    stream, include_usage = _stream_flags(req)
    stop, schema = _stop_strings(req), _response_format_schema(req)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    out = []
    for i, prompt in enumerate(prompts):
        ids = prompt_token_ids(prompt, info, tokenizer)
        _check_prompt_ids(ids, info)
        max_tokens = _resolve_max_tokens(len(ids), requested, "max_tokens", info, "prompt",
                                         echo=bool(req.echo))
        params = _sampling_params(req, max_tokens, req.logprobs, info, schema, prompt_k)
        rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        gen = GenerateRequest(request_id=rid, prompt_token_ids=ids, params=params)
        echo = None
        if req.echo:
            echo = prompt if isinstance(prompt, str) else (
                tokenizer.decode(ids) if tokenizer is not None else "")
        out.append(ParsedRequest(kind="completion", request=gen, model=info.name, stream=stream,
                                 include_usage=include_usage, num_logprobs=req.logprobs,
                                 stop=stop, echo=echo, echo_logprobs=echo_logprobs,
                                 echo_only=bool(req.echo) and requested == 0,
                                 prompt_logprobs=req.prompt_logprobs))
    if len(out) > 1:
        for p in out[1:]:
            p.created = out[0].created
        return out
    return out[0]


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


def _content_text(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    if any(p.type != "text" for p in m.content):
        raise bad_request(f"`messages[{i}].content`: only text parts are supported",
                          param=f"messages[{i}].content")
    return "".join(p.text for p in m.content)


def chat_prompt_ids(messages: list[ChatMessage], info: ModelInfo, tokenizer: Tokenizer | None,
                    tools: list[dict] | None = None) -> list[int]:
    """Render the chat template (with the generation prompt) and encode it.

    ``tools`` (OpenAI's tool objects) go to the template when it takes them, else into a
    system message. The BOS token is added by ``encode`` unless the template already wrote it.
    """
    if not messages:
        raise bad_request("`messages` is empty", param="messages")
    tok = _need_tokenizer(tokenizer, info, "chat completions need one", "messages")
    native = tok.template_takes_tools
    plain: list[dict] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"`messages[{i}].role` must be one of {', '.join(CHAT_ROLES)}, "
                              f"got {m.role!r}", param=f"messages[{i}].role")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(f"`messages[{i}].content` is required", param=f"messages[{i}].content")
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"`messages[{i}].tool_calls`: only assistant messages make calls",
                              param=f"messages[{i}].tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise bad_request(f"`messages[{i}].tool_call_id` is required for role tool",
                              param=f"messages[{i}].tool_call_id")
        msg: dict = {"role": m.role, "content": _content_text(m, i)}
        if m.tool_calls:
            if native:
                msg["tool_calls"] = [msgspec.to_builtins(c) for c in m.tool_calls]
            else:
                msg["content"] = "\n".join(x for x in (msg["content"],
                                                        tool_call_text(m.tool_calls)) if x)
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        plain.append(msg)
    if tools and not native:
        text = tools_system_text(tools)
        if plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": plain[0]["content"] + "\n\n" + text}
        else:
            plain.insert(0, {"role": "system", "content": text})
    try:
        text = tok.apply_chat_template(plain, add_generation_prompt=True,
                                       tools=tools if native else None)
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
    tools, tool_schema = tool_mode(req.tools or [], req.tool_choice, req.parallel_tool_calls)
    schema = _response_format_schema(req)
    if tool_schema is not None and schema is not None:
        raise bad_request("`response_format` cannot be combined with a required or named "
                          "`tool_choice`", param="response_format")
    tool_dicts = ([msgspec.to_builtins(t) for t in req.tools]
                  if tools is not None and req.tools else None)
    ids = chat_prompt_ids(req.messages, info, tokenizer, tool_dicts)
    _check_prompt_ids(ids, info)
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = _resolve_max_tokens(len(ids), requested, param, info, "messages")
    _check_prompt_logprobs(req.prompt_logprobs)
    params = _sampling_params(req, max_tokens, num_logprobs, info, tool_schema or schema,
                              req.prompt_logprobs)
    stream, include_usage = _stream_flags(req)
    gen = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_token_ids=ids,
                          params=params)
    return ParsedRequest(kind="chat", request=gen, model=info.name, stream=stream,
                         include_usage=include_usage, num_logprobs=num_logprobs,
                         stop=_stop_strings(req), tools=tools,
                         prompt_logprobs=req.prompt_logprobs)
