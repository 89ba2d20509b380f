"""EngineCore: one engine instance (model, KV pool, scheduler, runner) stepping requests.

A request's lifecycle in one engine:

    add_request ──> WAITING ──schedule: prefill (blocks for all its tokens)──> RUNNING
                      ^                                                        │
                      └──── preempted: blocks freed, recompute later ◄── decode step (one
                                                                        token, one more slot)
    RUNNING ──EOS / stop id / max_tokens / max_model_len──> FINISHED (blocks freed)

An n-choice request (params.n > 1) is prefilled once: its ``choices`` (ids
``choice_request_id(id, i)``) are sampled from its logits and held sharing its
blocks; the blocks are freed when the last choice is released.

With prefix caching on (EngineConfig.enable_prefix_caching, the default), a
prefill computes only the tokens after the longest cached prefix, every
full block is registered in the cache once its KV is written, and a freed
block keeps its content until its memory is needed (engine/block_manager.py).
A prefill role therefore keeps a handed-off request's full blocks as cached.

Disaggregated roles reuse these pieces: a prefill worker runs only the
prefill step and hands the KV off (to a decode worker, or to its colocated
attention executor when the request is offloaded); a decode worker adopts
the request as RUNNING and runs decode steps.
"""

from __future__ import annotations

import itertools

import torch

from adrenaline.config import ConfigError, EngineConfig, ModelConfig
from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.grammar import GrammarCompiler
from adrenaline.engine.kv_pool import KVPool, num_blocks_for_budget
from adrenaline.engine.kv_transfer import export_blocks, import_blocks
from adrenaline.engine.request import Request, sampled_requests
from adrenaline.engine.runner import ModelRunner
from adrenaline.engine.sampler import Sampler
from adrenaline.engine.scheduler import Scheduler
from adrenaline.errors import InvalidRequestError
from adrenaline.kernels import make_attention_backend
from adrenaline.model.hf_config import load_model_config
from adrenaline.model.loader import load_model, resolve_dtype
from adrenaline.model.resolve import resolve_model_dir
from adrenaline.model.tokenizer import Tokenizer
from adrenaline.protocol import choice_request_id
from adrenaline.request_length import check_request_length
from adrenaline.sampling_params import SamplingParams


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but CUDA is not available")
    return dev


class EngineCore:
    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto",
                 config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_dir = resolve_model_dir(model)
        self.model_config: ModelConfig = load_model_config(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.model_config, self.device)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.tokenizer = (Tokenizer(self.model_dir)
                          if (self.model_dir / "tokenizer.json").is_file() else None)
        self.backend = make_attention_backend(config.attention_backend, self.device,
                                              mc.num_attention_heads, mc.num_key_value_heads,
                                              mc.head_dim, self.dtype)
        self.model = load_model(self.model_dir, mc, self.dtype, self.device, self.max_model_len)
        if (config.fused_ops and self.device.type == "cuda"
                and self.dtype in (torch.bfloat16, torch.float16)):
            from adrenaline.kernels.flashinfer_ops import FlashInferOps
            self.model.use_ops(FlashInferOps())
        self.num_kv_blocks = num_blocks_for_budget(config, mc, self.dtype)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size,
                                          enable_caching=config.enable_prefix_caching)
        graph_batch = min(config.cuda_graph_max_batch, config.max_num_seqs)
        on_cuda = graph_batch > 0 and self.device.type == "cuda"
        # One scratch block past the block manager's range: graph padding rows write there.
        self.pool = KVPool(mc.num_hidden_layers, self.num_kv_blocks, config.block_size,
                           self.backend, self.dtype, self.device, scratch_blocks=1)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.backend, self.pool, self.block_manager,
                                  Sampler(config.seed), self.device)
        if on_cuda:
            from adrenaline.engine.cuda_graphs import PiecewiseDecodeGraphs
            self.runner.piecewise = PiecewiseDecodeGraphs(self.model, graph_batch, self.device)
        if on_cuda and self.backend.supports_cuda_graphs:
            from adrenaline.engine.cuda_graphs import DecodeGraphs
            self.runner.graphs = DecodeGraphs(
                self.model, self.backend, self.pool, scratch_block=self.num_kv_blocks,
                max_batch=graph_batch, max_blocks_per_seq=-(-self.max_model_len // config.block_size),
                device=self.device)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # prefilled, blocks kept until export_kv + release
        # Held choices of n-choice requests: choice id -> the request owning the shared blocks.
        self._shared: dict[str, str] = {}
        self._sharers: dict[str, set[str]] = {}  # owner -> its choices still held
        self.grammars = GrammarCompiler(self.model_dir, mc.vocab_size, mc.eos_token_ids)
        self._arrivals = itertools.count()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def max_request_tokens(self) -> int:
        """Prompt + generated tokens one request may reach here (context and KV pool bound)."""
        return min(self.max_model_len, self.num_kv_blocks * self.config.block_size)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError(f"model {self.model_dir} has no tokenizer.json: "
                                      "pass prompts as token ids")
        return self.tokenizer.encode(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer else ""

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError unless the request can run to completion here."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside the vocabulary "
                                      f"[0, {vocab})")
        check_request_length(n, params.max_tokens, self.max_model_len, self.max_request_tokens)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, output_token_ids: list[int] = ()) -> Request:
        """Queue a request; ``output_token_ids``: tokens it generated already (a rerun)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)  # max_tokens counts the outputs too
        if params.n > 1 and output_token_ids:
            raise InvalidRequestError("a rerun continues one choice: n must be 1")
        req = self._new_request(request_id, prompt_token_ids, params, output_token_ids)
        if params.n > 1:
            req.choices = [self._new_request(choice_request_id(request_id, i), prompt_token_ids,
                                             params.for_choice(i)) for i in range(params.n)]
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _new_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, output_token_ids: list[int] = ()) -> Request:
        req = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                      params=params, arrival=next(self._arrivals),
                      eos_token_ids=self.model_config.eos_token_ids,
                      max_model_len=self.max_model_len)
        req.resume(list(output_token_ids))
        if params.n == 1:
            self.attach_grammar(req)
        return req

    def attach_grammar(self, req: Request) -> None:
        """Give a structured-output request its grammar state, replaying its output so far."""
        if req.params.json_schema is not None and req.grammar is None:
            req.grammar = self.grammars.state(req.params.json_schema, req.output_token_ids)

    def abort(self, request_id: str) -> None:
        if request_id in self.held or request_id in self._sharers:
            self.release(request_id)
            return
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req)

    def step(self) -> list[Request]:
        """Run one scheduled step; returns the requests that got a token (finished ones included)."""
        return self._run(self.scheduler.schedule(), keep_for_handoff=False)

    def prefill_step(self) -> list[Request]:
        """Prefill role: prefill waiting requests and sample each one's first token.

        Unfinished requests leave scheduling but keep their blocks, held for
        ``export_kv`` then ``release``; finished ones are freed at once.
        """
        return self._run(self.scheduler.schedule_prefill(), keep_for_handoff=True)

    def _run(self, plan, keep_for_handoff: bool) -> list[Request]:
        if plan is None or not plan.requests:
            return []
        tokens, logprobs = self.runner.execute(plan)
        for req in plan.requests:
            if not req.is_offloaded:  # its full blocks' KV is written: cache them
                self.block_manager.cache_blocks(req.request_id, req.token_ids, req.num_tokens)
            for c in req.choices or ():  # the prompt (and its logprobs) is the request's
                c.prompt_logprobs, c.prompt_ranks = req.prompt_logprobs, req.prompt_ranks
        # A choice's prompt KV is its n-choice request's (computed this step) too.
        for req, token, lp in zip(sampled_requests(plan.requests), tokens, logprobs):
            req.num_computed = req.num_tokens
            req.append_token(token, lp)
        for req in plan.requests:
            live = [c for c in req.choices if c.finish_reason is None] if req.choices else None
            if live is not None and keep_for_handoff and live:
                self.scheduler.detach(req)  # the choices share its blocks until released
                self._sharers[req.request_id] = {c.request_id for c in live}
                for c in live:
                    self.held[c.request_id] = c
                    self._shared[c.request_id] = req.request_id
            elif req.finish_reason is not None or live is not None:
                self.scheduler.finish(req)
                del self.requests[req.request_id]
            elif keep_for_handoff:
                self.scheduler.detach(req)
                self.held[req.request_id] = req
        return plan.requests

    def kv_owner(self, request_id: str) -> str:
        """The id whose blocks hold this request's KV (an n-choice request's, for a choice)."""
        return self._shared.get(request_id, request_id)

    def export_kv(self, request_id: str) -> torch.Tensor:
        """A held request's KV: its blocks covering the computed tokens (see kv_transfer)."""
        req = self.held[request_id]
        blocks = self.block_manager.block_table(self.kv_owner(request_id))
        return export_blocks(self.pool, self.backend.block_dim,
                             blocks[:self.block_manager.blocks_for(req.num_computed)])

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (after its KV was handed off, or on abort)."""
        for choice in list(self._sharers.get(request_id, ())):  # the n-choice request itself
            self.release(choice)
        if self.held.pop(request_id, None) is None:
            return
        owner = self._shared.pop(request_id, request_id)
        sharers = self._sharers.get(owner)
        if sharers is not None:
            sharers.discard(request_id)
            if sharers:
                return  # other choices still hold the blocks
            del self._sharers[owner]
        self.block_manager.free(owner)
        self.requests.pop(owner, None)

    def can_adopt(self, num_tokens: int) -> bool:
        return self.block_manager.can_allocate(num_tokens)

    def adopt(self, req: Request, kv: torch.Tensor | None) -> None:
        """Decode role: take in a request prefilled elsewhere, with the KV of its computed tokens.

        ``req.token_ids`` holds prompt + first token and ``req.num_computed`` the
        tokens whose KV ``kv`` carries; blocks are allocated here for all its tokens.
        An offloaded request (``req.executor`` set) comes without KV and gets no blocks.
        """
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        self.attach_grammar(req)
        if req.is_offloaded:  # its KV lives on the executor: nothing to allocate here
            req.arrival = next(self._arrivals)
            self.requests[req.request_id] = req
            self.scheduler.adopt(req)
            return
        blocks = self.block_manager.allocate(req.request_id, req.num_tokens)
        try:
            import_blocks(self.pool, self.backend.block_dim,
                          blocks[:self.block_manager.blocks_for(req.num_computed)], kv)
        except Exception:
            self.block_manager.free(req.request_id)
            raise
        req.arrival = next(self._arrivals)
        self.requests[req.request_id] = req
        self.scheduler.adopt(req)
