"""Responses of the OpenAI-compatible API: TokenDeltas -> response bodies and stream chunks.

``IncrementalDetokenizer`` turns a growing token sequence into text suffixes that are
never retracted; each choice (``_Choice``) cuts its text at a stop string and holds back a
tail that may begin one, and collects tool calls; ``CompletionResponder`` /
``ChatResponder`` build the final body or the stream chunks of all ``n`` choices; ``sse_event`` / ``SSE_DONE`` frame them as server-sent events.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import TokenDelta
from adrenaline.serve.openai_api.errors import APIError
from adrenaline.serve.openai_api.requests import ParsedRequest
from adrenaline.serve.openai_api.prompt_logprobs import (echo_logprobs, vllm_prompt_logprobs)
from adrenaline.serve.openai_api.tools import (TOOL_CALL_OPEN, parse_complete_tool_calls,
                                               parse_tool_calls)

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
# Stop strings and tool-call markers


def held_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker: text a
    stream must hold back, since the next tokens may complete the marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def _find_first(text: str, markers: list[str]) -> int:
    hits = [i for i in (text.find(m) for m in markers) if i >= 0]
    return min(hits) if hits else -1


class _Choice:
    """One choice's state: its tokens, and its text as released to the client.

    Invariants: ``text`` (released) never contains a stop string, and while streaming
    never ends with the start of one (that tail is held in ``pending``); once a stop string
    matched, the text before it is final and the choice is finished with "stop". With tool
    calls, output that is (or, in "auto", follows ``<tool_call>``) a call goes to ``call``
    instead, parsed when the choice finishes.
    """

    def __init__(self, index: int, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        self.index = index
        self.parsed = parsed
        self.detok = IncrementalDetokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float] | None] = []
        self.finish_reason: str | None = None
        self.stopped_early = False  # finished by a stop string (the router still runs it)
        self.text = ""
        self.pending = ""
        tools = parsed.tools
        self.call: str | None = "" if tools and tools.choice != "auto" else None
        self.tool_calls: list[dict] | None = None
        # From the first delta, with prompt logprobs asked (echo + logprobs, prompt_logprobs).
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_ranks: list[int | None] | None = None
        self._markers = list(parsed.stop) + ([TOOL_CALL_OPEN] if tools and tools.choice == "auto"
                                             else [])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def detok_prompt_ids(self) -> list[int]:
        return self.parsed.request.prompt_token_ids

    def advance(self, delta: TokenDelta) -> str:
        """Record a delta; returns the text it releases (none once finished)."""
        if self.finished:
            return ""  # a choice stopped by a stop string: what the router still sent
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs, self.prompt_ranks = delta.prompt_logprobs, delta.prompt_ranks
        if self.parsed.echo_only:  # max_tokens 0: the one token generated is not output
            if delta.finish_reason is not None:
                self.finish_reason = "length"
            return ""
        self.token_ids.extend(delta.token_ids)
        if self.parsed.num_logprobs is not None:
            lps = delta.logprobs or []
            self.logprobs.extend(lps[i] if i < len(lps) else None
                                 for i in range(len(delta.token_ids)))
        self.pending += self.detok.add(delta.token_ids)
        if delta.finish_reason is not None:
            self.pending += self.detok.finish()
        finish = delta.finish_reason
        stop = self.parsed.stop
        if stop and len(self.token_ids) >= self.parsed.min_tokens:
            at = _find_first(self.pending, stop)
            if at >= 0:
                self.pending = self.pending[:at]
                self.stopped_early = delta.finish_reason is None
                finish = "stop"
        if self.call is None and self.parsed.tools is not None:  # "auto": a call begins?
            at = self.pending.find(TOOL_CALL_OPEN)
            if at >= 0:
                self.call = self.pending[at:]
                self.pending = self.pending[:at]
        elif self.call is not None:
            self.call += self.pending
            self.pending = ""
        hold = 0 if finish is not None else held_suffix(self.pending, self._markers)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[
            len(self.pending) - hold:]
        if finish is not None:
            out += self._finish(finish)
        self.text += out
        return out

    def _finish(self, reason: str) -> str:
        """Settle the choice; returns text released by a failed tool-call parse."""
        self.finish_reason = reason
        if self.call is None:
            return ""
        if reason == "length":  # cut by max_tokens: the complete calls; a partial one is dropped
            self.tool_calls = parse_complete_tool_calls(self.parsed.tools, self.call) or None
            for c in self.tool_calls or ():
                c["id"] = f"call_{uuid.uuid4().hex[:24]}"
            return ""
        self.tool_calls = parse_tool_calls(self.parsed.tools, self.call)
        if self.tool_calls is None:
            return self.call  # not a call after all: it is the answer's text
        for c in self.tool_calls:
            c["id"] = f"call_{uuid.uuid4().hex[:24]}"
        if reason == "stop" and self.parsed.tools.choice != "named":
            self.finish_reason = "tool_calls"
        return ""


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Responder:
    """Collects one request's deltas (its ``n`` choices'); builds stream chunks and the body.

    Invariants: each choice's ``token_ids`` holds its generated tokens in order (up to the
    one completing a stop string); in streaming mode the concatenated chunk texts of a
    choice equal its final ``text``.
    """

    object_name = ""

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        self.parsed = parsed
        self.tokenizer = tokenizer
        self.choices = [_Choice(i, parsed, tokenizer) for i in range(parsed.n)]

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    def add(self, delta: TokenDelta) -> _Choice:
        """Record a (non-error) delta of choice ``delta.index``; returns that choice."""
        choice = self.choices[delta.index]
        choice.advance(delta)
        return choice

    def _chunk_body(self, choice: dict) -> dict:
        body = self._envelope(self.object_name, [choice])
        if self.parsed.include_usage:
            body["usage"] = None  # usage comes in its own chunk before [DONE]
        return body

    def usage(self) -> dict:
        return usage(self.parsed.num_prompt_tokens, sum(len(c.token_ids) for c in self.choices))

    def _envelope(self, object_name: str, choices: list) -> dict:
        p = self.parsed
        return {"id": p.request_id, "object": object_name, "created": p.created,
                "model": p.model, "choices": choices}

    def usage_chunk(self) -> dict:
        """The extra chunk sent before [DONE] when stream_options.include_usage is set."""
        body = self._envelope(self.object_name, [])
        body["usage"] = self.usage()
        return body

    @staticmethod
    def _sorted_entries(c: _Choice, i: int) -> tuple[float | None, list[tuple[int, float]]]:
        """(sampled token's logprob, all entries by decreasing logprob) of c's token i."""
        entry = c.logprobs[i] if i < len(c.logprobs) else None
        if not entry:
            return None, []
        return entry.get(c.token_ids[i]), sorted(entry.items(), key=lambda kv: -kv[1])


class CompletionResponder(_Responder):
    object_name = "text_completion"

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        super().__init__(parsed, tokenizer)
        self._text_offset = [0] * parsed.n  # streaming: offset of each choice's next token
        self._started: set[int] = set()  # streaming: choices that sent their first chunk

    def _logprobs(self, c: _Choice, start: int, end: int, text_offset: int = 0,
                  echo: bool = False) -> dict | None:
        """Completions logprobs of c's tokens [start, end); token ``start``'s text starts at
        ``text_offset`` (advanced in ``self._text_offset`` when streaming). With ``echo``
        (echo + logprobs), the prompt tokens' come first and the output's offsets follow
        the echoed prompt."""
        if self.parsed.num_logprobs is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        if echo and self.parsed.echo_logprobs:
            out = echo_logprobs(self.tokenizer, c.detok_prompt_ids, c.prompt_logprobs,
                                self.parsed.num_logprobs)
            text_offset = len(self.parsed.echo or "")
        for i in range(start, end):
            tok = token_text(self.tokenizer, c.token_ids[i])
            lp, entries = self._sorted_entries(c, i)
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({token_text(self.tokenizer, t): v for t, v in entries}
                                       if entries else None)
            out["text_offset"].append(text_offset)
            text_offset += len(tok)
        self._text_offset[c.index] = text_offset
        return out

    def chunk(self, delta: TokenDelta) -> dict | None:
        """The stream chunk for ``delta`` (None when it would carry nothing)."""
        c = self.choices[delta.index]
        if c.finished:
            return None
        start, first = len(c.token_ids), c.index not in self._started
        self._started.add(c.index)
        text = c.advance(delta)
        if first and self.parsed.echo:
            text = self.parsed.echo + text
        logprobs = self._logprobs(c, start, len(c.token_ids), self._text_offset[c.index],
                                  echo=first)
        if not text and logprobs is None and not c.finished:
            return None
        body = {"index": c.index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}
        if first and self.parsed.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(c)
        return self._chunk_body(body)

    def _vllm_prompt_logprobs(self, c: _Choice) -> list | None:
        return vllm_prompt_logprobs(self.tokenizer, c.detok_prompt_ids, c.prompt_logprobs,
                                    c.prompt_ranks, self.parsed.prompt_logprobs)

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            choice = {"index": c.index, "text": (self.parsed.echo or "") + c.text,
                      "logprobs": self._logprobs(c, 0, len(c.token_ids), echo=True),
                      "finish_reason": c.finish_reason}
            if self.parsed.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(c)
            choices.append(choice)
        body = self._envelope("text_completion", choices)
        body["usage"] = self.usage()
        return body


class ChatResponder(_Responder):
    object_name = "chat.completion.chunk"

    def __init__(self, parsed: ParsedRequest, tokenizer: Tokenizer | None):
        super().__init__(parsed, tokenizer)
        self._sent_role = [False] * parsed.n

    def _logprobs(self, c: _Choice, start: int, end: int) -> dict | None:
        n = self.parsed.num_logprobs
        if n is None:
            return None
        content = []
        for i in range(start, end):
            tok = token_text(self.tokenizer, c.token_ids[i])
            lp, entries = self._sorted_entries(c, i)
            top = [{"token": (t := token_text(self.tokenizer, tid)), "logprob": v,
                    "bytes": list(t.encode())} for tid, v in entries[:n]]
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                            "top_logprobs": top})
        return {"content": content}

    @staticmethod
    def _tool_calls(c: _Choice, streaming: bool) -> list[dict]:
        return [{**({"index": k} if streaming else {}), "id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}}
                for k, call in enumerate(c.tool_calls or [])]

    def chunk(self, delta: TokenDelta) -> dict | None:
        """The stream chunk for ``delta``; a choice's first one carries the role."""
        c = self.choices[delta.index]
        if c.finished:
            return None
        start = len(c.token_ids)
        text = c.advance(delta)
        logprobs = self._logprobs(c, start, len(c.token_ids))
        sent_role = self._sent_role[c.index]
        if sent_role and not text and logprobs is None and not c.finished:
            return None
        message: dict = {"content": text} if text else {}
        if not sent_role:
            self._sent_role[c.index] = True
            message = {"role": "assistant", "content": text}
        if c.tool_calls:
            message["tool_calls"] = self._tool_calls(c, streaming=True)
        return self._chunk_body({"index": c.index, "delta": message, "logprobs": logprobs,
                                 "finish_reason": c.finish_reason})

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            message: dict = {"role": "assistant", "content": c.text or (
                None if c.tool_calls else "")}
            if c.tool_calls:
                message["tool_calls"] = self._tool_calls(c, streaming=False)
            choices.append({"index": c.index, "message": message,
                            "logprobs": self._logprobs(c, 0, len(c.token_ids)),
                            "finish_reason": c.finish_reason})
        body = self._envelope("chat.completion", choices)
        if self.parsed.prompt_logprobs is not None:  # vLLM's: the prompt's, once per response
            c = self.choices[0]
            body["prompt_logprobs"] = vllm_prompt_logprobs(
                self.tokenizer, c.detok_prompt_ids, c.prompt_logprobs, c.prompt_ranks,
                self.parsed.prompt_logprobs)
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
