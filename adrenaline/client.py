"""Handle-based Python client for code running inside the Ray cluster.

``Client(app_name)`` talks to the app's Router deployment through a Serve
DeploymentHandle: no HTTP, same validation, same tokens. ``stream`` yields a
RequestOutput after each new token(s); closing the iterator (or cancelling
the task consuming it) cancels the request and frees its KV.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from ray import serve

from adrenaline.errors import InvalidRequestError
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import GenerateRequest, KVReport, ModelInfo, WorkerMetrics
from adrenaline.sampling_params import RequestOutput, SamplingParams


class Client:
    def __init__(self, app_name: str = "adrenaline", deployment: str = "Router"):
        self._handle = serve.get_deployment_handle(deployment, app_name=app_name)
        self._info: ModelInfo | None = None
        self._tokenizer: Tokenizer | None = None

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self._handle.model_info.remote()
        return self._info

    async def metrics(self) -> list[WorkerMetrics]:
        """Every worker's current metrics (KV blocks, running and waiting requests)."""
        return await self._handle.metrics.remote()

    async def check_kv(self) -> list[KVReport]:
        """Every worker's KV accounting audit: each page owned by a live request or free."""
        return await self._handle.check_kv.remote()

    async def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self._tokenizer is None:
            self._tokenizer = Tokenizer((await self.model_info()).model_dir)
        return self._tokenizer.encode(prompt)

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None
                     ) -> AsyncIterator[RequestOutput]:
        """Yield the request's state after each delta; the last one has finish_reason."""
        params = params or SamplingParams()
        ids = await self._tokenize(prompt)
        info = await self.model_info()
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < info.vocab_size)]
        if bad:
            raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside the vocabulary "
                                      f"[0, {info.vocab_size})")
        req = GenerateRequest(request_id=f"client-{uuid.uuid4().hex}", prompt_token_ids=ids,
                              params=params)
        out = RequestOutput(request_id=req.request_id, prompt_token_ids=ids, token_ids=[],
                            prompt=prompt if isinstance(prompt, str) else None,
                            logprobs=[] if params.logprobs is not None else None)
        gen = self._handle.options(stream=True).generate.remote(req)
        try:
            async for delta in gen:
                if delta.finish_reason == "error":
                    raise RuntimeError(f"request {req.request_id} failed: {delta.error}")
                out.token_ids.extend(delta.token_ids)
                if out.logprobs is not None and delta.logprobs:
                    out.logprobs.extend(delta.logprobs)
                out.finish_reason = delta.finish_reason
                if self._tokenizer is not None or isinstance(prompt, str):
                    out.text = await self._decode(out.token_ids)
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            gen.cancel()  # a no-op once finished; otherwise the router frees the request

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None
                       ) -> RequestOutput:
        out = None
        async for out in self.stream(prompt, params):
            pass
        if out is not None and out.text == "" and out.token_ids:
            out.text = await self._decode(out.token_ids)
        return out

    async def _decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer((await self.model_info()).model_dir)
        return self._tokenizer.decode(ids)
