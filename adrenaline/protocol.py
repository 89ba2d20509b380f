"""Wire structs between the ingress, the router and the workers (msgspec, process-crossing)."""

from __future__ import annotations

import msgspec

from adrenaline.sampling_params import SamplingParams


def choice_request_id(request_id: str, index: int) -> str:
    """The id of choice ``index`` of an n-choice request (as held, handed off and decoded)."""
    return f"{request_id}/{index}"


class GenerateRequest(msgspec.Struct, kw_only=True):
    """A tokenized, validated request as the router receives it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # A recovery rerun: tokens the request generated (and streamed) already; they are
    # output, not prompt, for max_tokens, min_tokens, penalties and the grammar.
    output_token_ids: list[int] = []


class TokenDelta(msgspec.Struct, kw_only=True):
    """New tokens of one request (one choice) since its previous delta (one per step).

    The first delta of a request carries the token sampled by prefill; the last one
    has ``finish_reason`` set: "length" or "stop" (nothing produces another; control
    signals travel apart, as serve/attempt.py's ``Control``). ``finish_error``
    (serve/openai_api/errors.py) still maps an "abort" or an "error" reason (``error``:
    why) to the client's error.
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    index: int = 0  # the choice of an n-choice request (set by the router)
    # First delta only, with params.prompt_logprobs: per prompt token its logprob and
    # top-k (None for the first token), and its rank in the vocabulary.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None


class ModelInfo(msgspec.Struct, kw_only=True):
    """What the ingress needs to validate requests before they reach the router."""

    name: str
    model_dir: str
    max_model_len: int
    vocab_size: int
    max_request_tokens: int  # prompt + max_tokens that fits one decode worker's KV pool
    eos_token_ids: tuple[int, ...] = ()


class WorkerMetrics(msgspec.Struct, kw_only=True):
    """What each worker reports (polled by the router, exported by the ingress)."""

    role: str  # "prefill" | "decode" | "executor"
    index: int
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int = 0
    num_preemptions: int = 0
    num_offloaded: int = 0  # decode: running requests whose attention is on an executor
    step_time_s: float = 0.0  # decode and prefill: total time in steps
    # decode: the engine thread's own CPU time in those steps (step_time_s minus this:
    # time the step waited, on executors or for its core)
    step_cpu_s: float = 0.0
    batch_size_sum: int = 0  # decode: sum of step batch sizes
    local_kv_tokens_sum: int = 0  # decode: sum over steps of the KV its local attention read
    remote_wait_s: float = 0.0  # decode: time waiting on executors' outputs (not overlapped)
    num_remote_waits: int = 0  # decode: per-layer exchanges waited on
    # decode: the executor a step is waiting on right now (-1: none), and for how long
    # (a decode worker blocked on an executor is not hung itself; that executor may be).
    waiting_on_executor: int = -1
    waiting_s: float = 0.0
    kv_bytes_read: int = 0  # executor: KV bytes its attention read (bandwidth use)
    busy_s: float = 0.0  # executor: time computing attention
    busy_cpu_s: float = 0.0  # executor: its own CPU time in busy_s (the rest: preempted)
    serve_cpu_s: float = 0.0  # executor: its serving threads' CPU time, polling included
    napped_s: float = 0.0  # executor: time napped between layers (its core given back)
    # Prefix cache (prefill workers; the token counts are cumulative since it started):
    # tokens prefilled, tokens of those whose KV came from the cache, and pages now
    # holding a cached prefix block.
    prefill_tokens: int = 0
    prefix_cached_tokens: int = 0
    kv_blocks_cached: int = 0


class PrefillResult(msgspec.Struct, kw_only=True):
    """A prefilled request: its first token, and the shape of the KV the prefill worker holds.

    ``token_ids`` = prompt + first token; ``num_computed`` tokens have KV, carried by
    one tensor of ``kv_shape``/``kv_dtype`` (see engine/kv_transfer.py).
    A seeded request needs no generator state: each draw is keyed by (seed, position).
    """

    request_id: str
    token_ids: list[int]
    num_computed: int
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    kv_shape: tuple[int, ...] = ()
    kv_dtype: str = ""
    # Prefix cache: prompt tokens whose KV came from the prefill instance's cache, and
    # the block hashes it evicted during this prefill's step (the router's record of
    # what the instance holds drops them; see policy/prefix.py).
    num_cached_tokens: int = 0
    evicted_hashes: list[int] = []
    # With params.prompt_logprobs (see engine/prompt_logprobs.py); else None.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None


class WorkerInfo(msgspec.Struct, kw_only=True):
    """Static facts of one worker's engine, read by the router at start-up."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    max_request_tokens: int
    eos_token_ids: tuple[int, ...]
    num_kv_blocks: int
    block_size: int
    prefix_caching: bool = False  # EngineConfig.enable_prefix_caching


class KVReport(msgspec.Struct, kw_only=True):
    """One actor's KV accounting audit (see engine/kv_audit.py); ``problems`` empty when sound."""

    role: str  # "prefill" | "decode" | "executor"
    index: int
    num_blocks: int
    num_free: int
    owners: dict[str, int]  # owner (request id or executor handle) -> pages held
    problems: list[str]
    num_cached: int = 0  # pages holding a cached prefix block (in use or free)
    num_evictable: int = 0  # free pages still holding a cached prefix block (counted free)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free
