"""Responses of the OpenAI-compatible API: TokenDeltas -> response bodies and stream chunks.

``IncrementalDetokenizer`` turns a growing token sequence into text suffixes that are
never retracted; ``CompletionResponder`` / ``ChatResponder`` build the final body or the
stream chunks; ``sse_event`` / ``SSE_DONE`` frame them as server-sent events.
"""

from __future__ import annotations

from typing import Any

import msgspec

from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import TokenDelta
from adrenaline.serve.openai_api.errors import APIError
from adrenaline.serve.openai_api.requests import ParsedRequest

# ---------------------------------------------------------------------------------------------
# Detokenization


class IncrementalDetokenizer:
    """Text of a growing token sequence, handed out as suffixes.

    Each ``add`` decodes all ids so far and returns the text past what was
    already emitted, holding back a trailing run of U+FFFD (an incomplete UTF-8
    sequence that later tokens may complete). ``finish`` flushes the rest.
    Invariant: ``emitted`` is a prefix of ``decode(ids)`` (true of byte-level
    decoders, whose output for a prefix of the ids is a prefix of the output),
    and after ``finish`` it equals ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer | None):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        return self._emit(self._decode().rstrip("\ufffd"))

    def finish(self) -> str:
        return self._emit(self._decode())

    def _decode(self) -> str:
        return self._tokenizer.decode(self.ids) if self._tokenizer is not None else ""

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.emitted):
            return ""
        new = text[len(self.emitted):]  # text starts with emitted (see the invariant)
        self.emitted = text
        return new


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """One token's text for logprobs (special tokens kept; "token_id:N" without a tokenizer)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Responder:
    """Collects one request's deltas; builds its stream chunks and its final body.

    Invariants: ``token_ids`` holds every generated token in order; in streaming
    mode the concatenated chunk texts equal ``decode(token_ids)`` once the final
    delta went through ``chunk``.
    """

    object_name = ""

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        self.parsed = parsed
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float] | None] = []
        self.finish_reason: str | None = None

    def add(self, delta: TokenDelta) -> None:
        """Record a (non-error) delta without formatting it (non-streaming)."""
        self.token_ids.extend(delta.token_ids)
        if self.parsed.num_logprobs is not None:
            lps = delta.logprobs or []
            self.logprobs.extend(lps[i] if i < len(lps) else None
                                 for i in range(len(delta.token_ids)))
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def _advance(self, delta: TokenDelta) -> tuple[int, str]:
        """Record a streamed delta; returns (index of its first token, the new text to send)."""
        start = len(self.token_ids)
        self.add(delta)
        text = self.detok.add(delta.token_ids)
        if delta.finish_reason is not None:
            text += self.detok.finish()
        return start, text

    def _chunk_body(self, choice: dict) -> dict:
        body = self._envelope(self.object_name, [choice])
        if self.parsed.include_usage:
            body["usage"] = None  # usage comes in its own chunk before [DONE]
        return body

    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids) if self.tokenizer is not None else ""

    def usage(self) -> dict:
        return usage(self.parsed.num_prompt_tokens, len(self.token_ids))

    def _envelope(self, object_name: str, choices: list) -> dict:
        p = self.parsed
        return {"id": p.request_id, "object": object_name, "created": p.created,
                "model": p.model, "choices": choices}

    def usage_chunk(self) -> dict:
        """The extra chunk sent before [DONE] when stream_options.include_usage is set."""
        body = self._envelope(self.object_name, [])
        body["usage"] = self.usage()
        return body

    def _sorted_entries(self, i: int) -> tuple[float | None, list[tuple[int, float]]]:
        """(sampled token's logprob, all entries by decreasing logprob) of generated token i."""
        entry = self.logprobs[i] if i < len(self.logprobs) else None
        if not entry:
            return None, []
        return entry.get(self.token_ids[i]), sorted(entry.items(), key=lambda kv: -kv[1])


class CompletionResponder(_Responder):
    object_name = "text_completion"

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        super().__init__(parsed, tokenizer)
        self._text_offset = 0  # streaming: offset of the next token's text in the completion

    def _logprobs(self, start: int, end: int, text_offset: int = 0) -> dict | None:
        """Completions logprobs of tokens [start, end); token ``start``'s text starts at
        ``text_offset`` (advanced into ``self._text_offset`` when streaming)."""
        if self.parsed.num_logprobs is None:
            return None
        self._text_offset = text_offset
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for i in range(start, end):
            tok = token_text(self.tokenizer, self.token_ids[i])
            lp, entries = self._sorted_entries(i)
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({token_text(self.tokenizer, t): v for t, v in entries}
                                       if entries else None)
            out["text_offset"].append(self._text_offset)
            self._text_offset += len(tok)
        return out

    def chunk(self, delta: TokenDelta) -> dict | None:
        """The stream chunk for ``delta`` (None when it would carry nothing)."""
        start, text = self._advance(delta)
        logprobs = self._logprobs(start, len(self.token_ids), self._text_offset)
        if not text and logprobs is None and delta.finish_reason is None:
            return None
        return self._chunk_body({"index": 0, "text": text, "logprobs": logprobs,
                                 "finish_reason": delta.finish_reason})

    def response(self) -> dict:
        body = self._envelope("text_completion", [
            {"index": 0, "text": self.text(), "logprobs": self._logprobs(0, len(self.token_ids)),
             "finish_reason": self.finish_reason}])
        body["usage"] = self.usage()
        return body


class ChatResponder(_Responder):
    object_name = "chat.completion.chunk"

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        super().__init__(parsed, tokenizer)
        self._sent_role = False

    def _logprobs(self, start: int, end: int) -> dict | None:
        n = self.parsed.num_logprobs
        if n is None:
            return None
        content = []
        for i in range(start, end):
            tok = token_text(self.tokenizer, self.token_ids[i])
            lp, entries = self._sorted_entries(i)
            top = [{"token": (t := token_text(self.tokenizer, tid)), "logprob": v,
                    "bytes": list(t.encode())} for tid, v in entries[:n]]
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def chunk(self, delta: TokenDelta) -> dict | None:
        """The stream chunk for ``delta``; the first one carries the role."""
        start, text = self._advance(delta)
        logprobs = self._logprobs(start, len(self.token_ids))
        if self._sent_role and not text and logprobs is None and delta.finish_reason is None:
            return None
        if not self._sent_role:
            self._sent_role = True
            message: dict = {"role": "assistant", "content": text}
        else:
            message = {"content": text} if text else {}
        return self._chunk_body({"index": 0, "delta": message, "logprobs": logprobs,
                                 "finish_reason": delta.finish_reason})

    def response(self) -> dict:
        body = self._envelope("chat.completion", [
            {"index": 0, "message": {"role": "assistant", "content": self.text()},
             "logprobs": self._logprobs(0, len(self.token_ids)),
             "finish_reason": self.finish_reason}])
        body["usage"] = self.usage()
        return body


def make_responder(parsed: ParsedRequest, tokenizer: Tokenizer | None
                   ) -> CompletionResponder | ChatResponder:
    cls = CompletionResponder if parsed.kind == "completion" else ChatResponder
    return cls(parsed, tokenizer)


# ---------------------------------------------------------------------------------------------
# Server-sent events

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(obj: dict) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def sse_error(err: APIError) -> bytes:
    """The error event sent in place of further chunks once a stream has started."""
    return sse_event(err.body())


def json_bytes(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
