"""The HTTP ingress: a FastAPI app served by the ``Ingress`` Ray Serve deployment.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics``, and vLLM's ``POST /tokenize``,
``POST /detokenize``, ``GET /version`` (openai_api/utility.py). A completions request
with several prompts runs as one router request per prompt (openai_api/batch.py).

A request is parsed and validated here (``openai_api``), tokenized here, and
handed to the router as a ``GenerateRequest``; the router streams TokenDeltas
back. Invariant: every request the router accepted either ends with a final
delta (finish_reason set) or is cancelled *and* aborted on the router
(``_RouterStream.close``), whatever happens to the client, so no worker keeps
its KV blocks. When the router replica itself is lost, the request is sent again
to its successor with the tokens already passed on (serve/router_resume.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import typing
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from adrenaline.model.resolve import resolve_model_dir
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import GenerateRequest, ModelInfo, TokenDelta
from adrenaline.app_config import AppArgs, parse_app_args
from adrenaline.serve.auth import APIKeys
from adrenaline.serve.gate import IngressGate, Slot
from adrenaline.serve.metrics import CONTENT_TYPE, IngressMetrics, RequestTracker
from adrenaline.serve.openai_api import utility
from adrenaline.serve.openai_api.batch import (BatchResponder, StreamBatch, complete_batch,
                                               sse_batch)
from adrenaline.serve.openai_api.errors import APIError, finish_error, router_error
from adrenaline.serve.openai_api.requests import (ParsedRequest, parse_chat_request,
                                                  parse_completion_request)
from adrenaline.serve.openai_api.responses import (SSE_DONE, json_bytes, make_responder,
                                                   sse_error, sse_event)
from adrenaline.serve.router_resume import RouterLink

logger = logging.getLogger("adrenaline.serve.ingress")

ROUTER_CALL_TIMEOUT_S = 10.0  # model_info / metrics / abort calls (not generation)

fastapi_app = FastAPI(title="adrenaline", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(err: APIError) -> Response:
    return Response(json_bytes(err.body()), status_code=err.status,
                    media_type="application/json", headers=err.headers)


@fastapi_app.exception_handler(APIError)
async def _api_error_handler(_request: Request, exc: APIError) -> Response:
    return error_response(exc)


def _eager_annotations(fn):
    """Evaluate a route's postponed (string) annotations.

    Ray Serve's class-based view re-signs each route through ``__signature__``,
    which FastAPI takes as is: a string ``"Request"`` would turn the parameter
    into a required query parameter (422). Apply below the FastAPI decorator.
    """
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn


Parser = Callable[[bytes, ModelInfo, Tokenizer | None], ParsedRequest | list[ParsedRequest]]


class _RouterStream:
    """One request's TokenDelta stream from the router (resent if the router is lost).

    ``close`` is idempotent: after a final delta it only settles the metrics;
    otherwise (client gone, error, rejection) it cancels the stream and aborts
    the request on the router from a task detached from the HTTP request's
    context (Serve cancels a cancelled request's child calls, which would
    otherwise include the abort itself).
    """

    def __init__(self, link: RouterLink, req: GenerateRequest,
                 tracker: RequestTracker, background: set[asyncio.Task]):
        self._router = link.router
        self._request_id = req.request_id
        self._tracker = tracker
        self._background = background
        self._gen = link.stream(req, lambda rid: self._spawn(self._abort(rid)))
        self._done = False
        self._reason = "abort"  # what close() records if no final delta came
        self._unfinished = set(range(req.params.n))  # choices without a final delta yet

    async def next(self) -> TokenDelta:
        try:
            delta = await self._gen.__anext__()
        except StopAsyncIteration:  # only after the client's own stop_choice/close
            self._reason = "error"
            raise APIError(500, "the router ended the stream without a finish reason") from None
        except Exception as e:
            err = router_error(e)
            self._reason = {400: "rejected", 429: "overloaded"}.get(err.status, "error")
            raise err from None
        self._tracker.tokens(len(delta.token_ids))
        if delta.finish_reason is not None:
            self._unfinished.discard(delta.index)
            if not self._unfinished:
                self._done = True
                self._tracker.finish(delta.finish_reason)
        return delta

    def stop_choice(self, index: int) -> None:
        """Choice ``index`` matched a stop string: stop generating it (the whole request
        once no other choice runs). Idempotent."""
        if index not in self._unfinished:
            return
        self._unfinished.discard(index)
        if not self._unfinished:
            self._reason = "stop"
            self.close()
        elif not self._done:
            self._gen.stop_choice(index)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        self._tracker.finish(self._reason)
        self._gen.close()  # cancels and aborts every router call carrying it

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self._router.abort.remote(request_id), ROUTER_CALL_TIMEOUT_S)
        except Exception as e:
            logger.warning("abort of %s failed: %s", request_id, _describe(e))


class _SSEResponse(StreamingResponse):
    """An event stream that closes its router stream however the response ends.

    The body generator closes the stream too, but a generator that never
    started (client gone before the first chunk) never runs its ``finally``.
    """

    def __init__(self, body: AsyncIterator[bytes], stream: _RouterStream, slot: Slot):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._stream = stream
        self._slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()
            self._slot.release()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (never read whole into memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")


# Last in the module: @serve.deployment pickles the class by value when it is decorated, so
# every module-level name its methods use must already be defined. max_ongoing_requests:
# Serve's default (5) would cap concurrent streams; build_app replaces these defaults with
# the YAML's limits (AppArgs.ingress_serve_options).
@serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, router: DeploymentHandle, args: AppArgs | dict):
        self._args = args if isinstance(args, AppArgs) else parse_app_args(args)
        model_dir = resolve_model_dir(self._args.model)
        # Without tokenizer.json only token-id prompts are served (text prompts -> 400).
        self._tokenizer = (Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file()
                           else None)
        self._router = router
        self._link = RouterLink(router, self._args.recovery)  # lost router: resend, wait
        self._info: ModelInfo | None = None  # fetched from the router on first use
        self._metrics = IngressMetrics()
        self._gate = IngressGate(self._args.limits)  # 429 before any heavy work
        self._keys = APIKeys(self._args.api_keys)  # + the environment's; none: open
        self._background: set[asyncio.Task] = set()  # fire-and-forget aborts, kept alive

    # -- routes ----------------------------------------------------------------------------

    @fastapi_app.post("/v1/completions")
    @_eager_annotations
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._generate(request, functools.partial(
            parse_completion_request,
            max_prompts=self._args.limits.max_prompts_per_request))

    @fastapi_app.post("/v1/chat/completions")
    @_eager_annotations
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._generate(request, parse_chat_request)

    @fastapi_app.get("/v1/models")
    @_eager_annotations
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        info = await self._model_info()
        return Response(json_bytes({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": 0, "owned_by": "adrenaline",
             "max_model_len": info.max_model_len}]}), media_type="application/json")

    @fastapi_app.post("/tokenize")
    @_eager_annotations
    async def tokenize(self, request: Request) -> Response:
        return await self._utility(request, utility.tokenize)

    @fastapi_app.post("/detokenize")
    @_eager_annotations
    async def detokenize(self, request: Request) -> Response:
        return await self._utility(request, utility.detokenize)

    @fastapi_app.get("/version")
    @_eager_annotations
    async def version(self, request: Request) -> Response:
        self._authorize(request)
        return Response(json_bytes(utility.server_version()), media_type="application/json")

    async def _utility(self, request: Request, handler) -> Response:
        self._authorize(request)
        body = await _read_body(request, self._args.limits.max_request_bytes)
        return Response(json_bytes(handler(body, await self._model_info(), self._tokenizer)),
                        media_type="application/json")

    @fastapi_app.get("/health")
    @_eager_annotations
    async def health(self, request: Request) -> Response:
        """200 while the router answers model_info (each call asks it again), else 503
        (at once while a lost router is awaited)."""
        self._authorize(request, control=True)
        if not self._link.up:
            return error_response(APIError(503, "the router is being restarted",
                                           code="unavailable", headers={"Retry-After": "1"}))
        try:
            self._info = await asyncio.wait_for(self._router.model_info.remote(),
                                                ROUTER_CALL_TIMEOUT_S)
        except Exception as e:
            return error_response(APIError(503, f"the router is not ready: {_describe(e)}"))
        return Response(json_bytes({"status": "ok"}), media_type="application/json")

    @fastapi_app.get("/metrics")
    @_eager_annotations
    async def metrics(self, request: Request) -> Response:
        self._authorize(request, control=True)
        try:
            workers = await asyncio.wait_for(self._router.metrics.remote(),
                                             ROUTER_CALL_TIMEOUT_S)
        except Exception as e:
            logger.warning("router.metrics() failed: %s", _describe(e))
            workers = None
        self._metrics.set_workers(workers)
        try:
            stats = await asyncio.wait_for(self._router.stats.remote(), ROUTER_CALL_TIMEOUT_S)
        except Exception as e:
            logger.warning("router.stats() failed: %s", _describe(e))
            stats = None
        self._metrics.policy.set_stats(stats)
        self._metrics.set_router(stats)
        return Response(self._metrics.render(), media_type=CONTENT_TYPE)

    def _authorize(self, request: Request, control: bool = False) -> None:
        """401 (APIError) without a configured key; /health and /metrics may stay open."""
        if not (control and self._args.open_health_metrics):
            self._keys.check(request.headers.get("authorization"))

    # -- generation ------------------------------------------------------------------------

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self._router.model_info.remote(),
                                                    ROUTER_CALL_TIMEOUT_S)
            except Exception as e:
                raise APIError(503, f"the model is not ready: {_describe(e)}") from None
        return self._info

    async def _generate(self, request: Request, parse: Parser) -> Response:
        start = time.perf_counter()
        slot = self._gate.enter()  # 429 at once when full: before the body is even read
        stream = None
        try:
            body = await _read_body(request, self._args.limits.max_request_bytes)
            parsed = parse(body, await self._model_info(), self._tokenizer)  # APIError
            if isinstance(parsed, list):  # several prompts: _batch owns the slot from here
                owned, slot = slot, None
                return await self._batch(parsed, start, owned)
            stream = _RouterStream(self._link, parsed.request,
                                   self._metrics.track(parsed.num_prompt_tokens, start),
                                   self._background)
            # Wait for the first delta before answering, so that a request the router
            # rejects gets a plain 400 even when streaming.
            first = await stream.next()
            err = finish_error(first)
            if err is not None:
                raise err
            if parsed.stream:
                response = _SSEResponse(self._sse(parsed, stream, first), stream, slot)
                stream = slot = None  # the response owns (and closes) them now
                return response
            return await self._complete(parsed, stream, first)
        finally:
            if stream is not None:
                stream.close()
            if slot is not None:
                slot.release()

    async def _batch(self, parsed: list[ParsedRequest], start: float, slot: Slot) -> Response:
        """Several prompts (openai_api/batch.py): one router stream each, merged."""
        streams: list[_RouterStream] | None = []
        batch = None
        try:
            for p in parsed:
                streams.append(_RouterStream(self._link, p.request,
                                             self._metrics.track(p.num_prompt_tokens, start),
                                             self._background))
            batch = StreamBatch(streams, parsed[0].n)
            await batch.start()
            responder = BatchResponder(parsed, self._tokenizer)
            if parsed[0].stream:
                response = _SSEResponse(sse_batch(batch, responder, parsed[0].include_usage),
                                        batch, slot)
                streams = slot = None  # the response owns (and closes) them now
                return response
            return Response(json_bytes(await complete_batch(batch, responder)),
                            media_type="application/json")
        finally:
            if batch is not None and streams is not None:
                batch.close()
            for s in streams or ():
                s.close()
            if slot is not None:
                slot.release()

    async def _complete(self, parsed: ParsedRequest, stream: _RouterStream,
                        delta: TokenDelta) -> Response:
        responder = make_responder(parsed, self._tokenizer)
        while True:
            err = finish_error(delta)
            if err is not None:
                raise err
            if responder.add(delta).stopped_early:
                stream.stop_choice(delta.index)
            if responder.done:
                return Response(json_bytes(responder.response()),
                                media_type="application/json")
            delta = await stream.next()

    async def _sse(self, parsed: ParsedRequest, stream: _RouterStream,
                   delta: TokenDelta) -> AsyncIterator[bytes]:
        """The event stream: chunks, [usage chunk], [DONE]; an error event replaces the rest
        ([DONE] included: it stands for a complete answer)."""
        responder = make_responder(parsed, self._tokenizer)
        failed = True
        try:
            while True:
                err = finish_error(delta)
                if err is not None:
                    yield sse_error(err)
                    break
                chunk = responder.chunk(delta)
                if chunk is not None:
                    yield sse_event(chunk)
                if responder.choices[delta.index].stopped_early:
                    stream.stop_choice(delta.index)
                if responder.done:
                    if parsed.include_usage:
                        yield sse_event(responder.usage_chunk())
                    failed = False
                    break
                delta = await stream.next()
        except APIError as e:
            yield sse_error(e)
        except Exception as e:  # a formatting bug must still end the stream properly
            logger.exception("stream %s failed", parsed.request_id)
            yield sse_error(APIError(500, f"internal error: {_describe(e)}"))
        finally:
            stream.close()
        if not failed:
            yield SSE_DONE
