"""vLLM's utility routes, without HTTP: /tokenize, /detokenize and /version bodies.

Same field names as vLLM's server: /tokenize takes ``prompt`` (with
``add_special_tokens``, default true) or chat ``messages`` (rendered with the chat
template and the generation prompt, as a chat request is) and answers ``count``,
``max_model_len``, ``tokens`` and ``token_strs`` (with ``return_token_strs``);
/detokenize takes ``tokens`` and answers ``prompt``; /version answers ``version``.
``model`` is optional; when given it must be the served one.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import msgspec

from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import ModelInfo
from adrenaline.serve.openai_api.errors import APIError, bad_request
from adrenaline.serve.openai_api.requests import ChatMessage, _decode_body, chat_prompt_ids


class TokenizeBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: true; messages: the template decides
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


def _check_model(model: str | None, info: ModelInfo) -> None:
    if model is not None and model != info.name:
        raise APIError(404, f"The model `{model}` does not exist (this server serves "
                            f"`{info.name}`)", param="model", code="model_not_found")


def _tokenizer(tokenizer: Tokenizer | None, info: ModelInfo) -> Tokenizer:
    if tokenizer is None:
        raise bad_request(f"model `{info.name}` has no tokenizer.json")
    return tokenizer


def tokenize(body: bytes, info: ModelInfo, tokenizer: Tokenizer | None) -> dict:
    req = _decode_body(body, TokenizeBody, {})
    _check_model(req.model, info)
    tok = _tokenizer(tokenizer, info)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of `prompt` and `messages`", param="prompt")
    if req.prompt is not None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_special_tokens=add)
    else:
        if req.add_generation_prompt is False:
            raise bad_request("`add_generation_prompt` false is not supported",
                              param="add_generation_prompt")
        ids = chat_prompt_ids(req.messages, info, tok)
    return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids,
            "token_strs": ([tok.decode([t], skip_special_tokens=False) for t in ids]
                           if req.return_token_strs else None)}


def detokenize(body: bytes, info: ModelInfo, tokenizer: Tokenizer | None) -> dict:
    req = _decode_body(body, DetokenizeBody, {})
    _check_model(req.model, info)
    tok = _tokenizer(tokenizer, info)
    bad = [t for t in req.tokens if not 0 <= t < info.vocab_size]
    if bad:
        raise bad_request(f"token id(s) {bad[:5]} outside the vocabulary [0, {info.vocab_size})",
                          param="tokens")
    return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}  # as vLLM (HF default)


def server_version() -> dict:
    try:
        return {"version": version("adrenaline")}
    except PackageNotFoundError:  # run from a source tree that was never installed
        return {"version": "unknown"}
