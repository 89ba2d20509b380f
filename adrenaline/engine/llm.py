"""The offline engine facade: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import msgspec

from adrenaline.config import engine_config_from_options
from adrenaline.engine.core import EngineCore
from adrenaline.engine.request import Request
from adrenaline.errors import InvalidRequestError
from adrenaline.sampling_params import RequestOutput, SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate offline with continuous batching on one engine.

    ``model`` is a built-in name ("tiny", "small") or a local HF-format
    directory; ``engine_options`` are EngineConfig fields (block_size,
    kv_cache_tokens, kv_cache_bytes, max_num_seqs, max_num_batched_tokens,
    max_model_len, num_threads, seed, attention_backend, enable_prefix_caching:
    on by default, a prompt reuses the KV of its longest cached prefix).
    """

    def __init__(self, model: str = "tiny", *, dtype: str = "auto", device: str = "auto",
                 **engine_options):
        self.engine = EngineCore(model, dtype=dtype, device=device,
                                 config=engine_config_from_options(engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. All prompts are validated before any runs."""
        prompts = _as_prompt_list(prompts)
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self.engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        params = [_within_context(p, len(ids), self.engine.max_model_len)
                  for ids, p in zip(token_lists, params)]
        for ids, p in zip(token_lists, params):
            self.engine.validate(ids, p)
            if p.n != 1:  # choices share a prefill only on the disaggregated path (prefill_step)
                raise InvalidRequestError("LLM.generate returns one output per prompt: n must be 1")
        reqs: list[Request] = []
        try:
            for ids, p in zip(token_lists, params):
                reqs.append(self.engine.add_request(f"llm-{next(self._ids)}", ids, p))
            while any(not r.is_finished for r in reqs):
                self.engine.step()
        finally:  # an exception mid-run must not leave requests holding KV blocks
            for r in reqs:
                self.engine.abort(r.request_id)
        return [self._output(r, p) for r, p in zip(reqs, prompts)]

    def _output(self, req: Request, prompt: Prompt) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=req.prompt_token_ids, token_ids=req.output_token_ids,
            text=self.engine.decode(req.output_token_ids), finish_reason=req.finish_reason,
            logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs)


def _within_context(params: SamplingParams, n_prompt: int, max_model_len: int) -> SamplingParams:
    """Offline, as in vLLM's offline API, a request whose max_tokens passes the context ends
    at the context ("length"): its max_tokens is the room left there (request_length.py)."""
    room = max_model_len - n_prompt
    if 0 < room < params.max_tokens:
        return msgspec.structs.replace(params, max_tokens=room,
                                       min_tokens=min(params.min_tokens, room))
    return params


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise InvalidRequestError("prompts must be a string, a list of token ids, or a list of those")
    for p in prompts:
        if not isinstance(p, (str, list, tuple)):
            raise InvalidRequestError(f"prompt {p!r} is neither a string nor a list of token ids")
    return list(prompts)
