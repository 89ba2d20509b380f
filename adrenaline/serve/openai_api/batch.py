"""Several prompts in one /v1/completions request: one router request per prompt, merged.

Each prompt is its own router request (placed and offloaded on its own, with its own
``n`` choices); the client sees one response whose choice ``i * n + j`` is prompt
``i``'s choice ``j`` (as OpenAI indexes them), with the usage summed. While streaming,
chunks go out as the deltas arrive, so choices interleave, each chunk naming its index.

``StreamBatch`` merges the prompts' TokenDelta streams (objects with the ingress's
``_RouterStream`` interface: ``next``, ``stop_choice``, ``close``); ``BatchResponder``
formats the merged choices. Nothing here touches Ray or FastAPI.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import TokenDelta
from adrenaline.serve.openai_api.errors import APIError, finish_error
from adrenaline.serve.openai_api.requests import ParsedRequest
from adrenaline.serve.openai_api.responses import (SSE_DONE, CompletionResponder, sse_error,
                                                   sse_event, usage)

logger = logging.getLogger("adrenaline.serve.openai_api.batch")


class BatchResponder:
    """The prompts' CompletionResponders seen as one response (choice i * n + j)."""

    def __init__(self, parsed: list[ParsedRequest], tokenizer: Tokenizer | None):
        self.parsed = parsed
        self.parts = [CompletionResponder(p, tokenizer) for p in parsed]
        self.n = parsed[0].n
        self.request_id = parsed[0].request_id.rsplit("-", 1)[0]  # "<id>-0" -> "<id>"

    @property
    def done(self) -> bool:
        return all(p.done for p in self.parts)

    def _renumber(self, i: int, body: dict) -> dict:
        body["id"] = self.request_id
        for c in body["choices"]:
            c["index"] = i * self.n + c["index"]
        return body

    def usage(self) -> dict:
        return usage(sum(p.parsed.num_prompt_tokens for p in self.parts),
                     sum(len(c.token_ids) for p in self.parts for c in p.choices))

    def chunk(self, i: int, delta: TokenDelta) -> dict | None:
        body = self.parts[i].chunk(delta)
        return None if body is None else self._renumber(i, body)

    def usage_chunk(self) -> dict:
        body = self._renumber(0, self.parts[0].usage_chunk())
        body["usage"] = self.usage()
        return body

    def response(self) -> dict:
        bodies = [self._renumber(i, p.response()) for i, p in enumerate(self.parts)]
        body = bodies[0]
        body["choices"] = [c for b in bodies for c in b["choices"]]
        body["usage"] = self.usage()
        return body


class StreamBatch:
    """The prompts' streams, merged: ``(prompt index, delta)`` in arrival order.

    One pump task per stream reads it until each of its choices had a final delta; an
    error is passed on as the item. ``start`` waits for every prompt's first delta (so a
    request the router rejects is a plain 4xx, before any chunk went out). ``close``
    closes every stream (idempotent: each aborts on the router what did not finish).
    """

    def __init__(self, streams: list, n: int):
        self.streams = streams
        self._queue: asyncio.Queue[tuple[int, TokenDelta | Exception]] = asyncio.Queue()
        self._buffer: list[tuple[int, TokenDelta | Exception]] = []
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(i, s, n)) for i, s in enumerate(streams)]

    async def _pump(self, i: int, stream, n: int) -> None:
        unfinished = set(range(n))
        while unfinished:
            try:
                delta = await stream.next()
            except Exception as e:
                self._queue.put_nowait((i, e))
                return
            self._queue.put_nowait((i, delta))
            if delta.finish_reason is not None:
                unfinished.discard(delta.index)

    async def start(self) -> None:
        """Wait for each prompt's first delta; raise the first error among them."""
        waiting = set(range(len(self.streams)))
        while waiting:
            i, item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            err = finish_error(item)
            if err is not None:
                raise err
            waiting.discard(i)
            self._buffer.append((i, item))

    async def next(self) -> tuple[int, TokenDelta | Exception]:
        if self._buffer:
            return self._buffer.pop(0)
        return await self._queue.get()

    def stop_choice(self, i: int, index: int) -> None:
        self.streams[i].stop_choice(index)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self.streams:
            s.close()


async def _deltas(batch: StreamBatch, responder: BatchResponder
                  ) -> AsyncIterator[tuple[int, TokenDelta]]:
    """The merged deltas until every choice finished; an error raises APIError. Items of a
    prompt already done (its stream closed after stop strings) are skipped."""
    while not responder.done:
        i, item = await batch.next()
        if responder.parts[i].done:
            continue
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Exception):
            raise APIError(500, f"internal error: {type(item).__name__}: {item}")
        err = finish_error(item)
        if err is not None:
            raise err
        yield i, item


async def complete_batch(batch: StreamBatch, responder: BatchResponder) -> dict:
    """The whole (non-streaming) response body."""
    async for i, delta in _deltas(batch, responder):
        if responder.parts[i].add(delta).stopped_early:
            batch.stop_choice(i, delta.index)
    return responder.response()


async def sse_batch(batch: StreamBatch, responder: BatchResponder,
                    include_usage: bool) -> AsyncIterator[bytes]:
    """The event stream: chunks of all prompts' choices as they come, [usage], [DONE]; an
    error event ends it without [DONE] (which stands for a complete answer)."""
    failed = True
    try:
        async for i, delta in _deltas(batch, responder):
            chunk = responder.chunk(i, delta)
            if chunk is not None:
                yield sse_event(chunk)
            if responder.parts[i].choices[delta.index].stopped_early:
                batch.stop_choice(i, delta.index)
        if include_usage:
            yield sse_event(responder.usage_chunk())
        failed = False
    except APIError as e:
        yield sse_error(e)
    except Exception as e:  # a formatting bug must still end the stream properly
        logger.exception("batch stream %s failed", responder.request_id)
        yield sse_error(APIError(500, f"internal error: {type(e).__name__}: {e}"))
    finally:
        batch.close()
    if not failed:
        yield SSE_DONE
