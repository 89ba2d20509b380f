"""Frozen, validated configuration structs.

Every struct is a msgspec Struct (frozen): built once, validated in
``__post_init__`` with an error that names the offending field, never
mutated afterwards. Runtime facts (how many KV blocks fit, say) are returned
by the component that measures them, not written back here.
"""

from __future__ import annotations

import msgspec


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {why}")


class RopeScaling(msgspec.Struct, frozen=True):
    """RoPE scaling as HF config.json spells it (``rope_type`` or ``type``)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(self.rope_type in ("default", "linear", "llama3"), "rope_scaling.rope_type",
                 f"unsupported rope scaling {self.rope_type!r} (supported: default, linear, llama3)")
        _require(self.factor > 0, "rope_scaling.factor", "must be > 0")


class ModelConfig(msgspec.Struct, frozen=True):
    """The architecture facts the model needs, read from an HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # bias on q, k, v projections (Qwen2: True)
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"{self.num_key_value_heads} does not divide num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of one engine instance (offline LLM or a worker's engine).

    The KV budget (``kv_cache_tokens`` or ``kv_cache_bytes``) is what stands
    for a GPU's memory capacity on CPU: the block manager gets exactly that
    many tokens' worth of pages. When both are None, a default budget is used.
    """

    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # prefill token budget per step
    max_model_len: int | None = None  # defaults to the model's context
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's
    seed: int = 0  # seeds sampling of requests without their own seed
    attention_backend: str = "auto"  # "auto" | "cpu" | "torch" | "flashinfer"
    # Decode steps of up to this many requests replay captured CUDA graphs (CUDA with a
    # backend that supports them, i.e. flashinfer); 0 runs every step eagerly.
    cuda_graph_max_batch: int = 256
    # On CUDA in bf16/fp16: flashinfer's fused RMSNorm, residual-add + RMSNorm, RoPE and
    # SiLU-and-mul instead of plain torch ops (same math, fewer kernels, float32 inside).
    fused_ops: bool = True
    # Prefix caching (engine/block_manager.py): full KV blocks are kept, keyed by a hash
    # chain of their tokens, and a prefill computes only the tokens after the longest
    # cached prefix. Freed cached blocks are evicted (LRU) only when memory is needed.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "block_size", f"must be a power of two, got {self.block_size}")
        _require(self.kv_cache_tokens is None or self.kv_cache_tokens >= self.block_size,
                 "kv_cache_tokens", f"must hold at least one block ({self.block_size} tokens)")
        _require(self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes",
                 "must be > 0")
        _require(self.kv_cache_tokens is None or self.kv_cache_bytes is None, "kv_cache_tokens",
                 "give kv_cache_tokens or kv_cache_bytes, not both")
        _require(self.max_num_seqs > 0, "max_num_seqs", "must be > 0")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0")
        _require(self.max_model_len is None or self.max_model_len > 1, "max_model_len",
                 "must be > 1")
        _require(self.num_threads is None or self.num_threads > 0, "num_threads", "must be > 0")
        _require(self.cuda_graph_max_batch >= 0, "cuda_graph_max_batch", "must be >= 0")
        _require(self.attention_backend in ("auto", "cpu", "torch", "flashinfer"), "attention_backend",
                 f"unknown backend {self.attention_backend!r} (auto, cpu, torch, flashinfer)")


def engine_config_from_options(options: dict) -> EngineConfig:
    """Build an EngineConfig from keyword options, naming unknown or mistyped ones."""
    known = set(EngineConfig.__struct_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
    try:
        return msgspec.convert(options, EngineConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(str(e)) from None
