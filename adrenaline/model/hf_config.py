"""Read an HF config.json into a ModelConfig, rejecting what we cannot run."""

from __future__ import annotations

import json
from pathlib import Path

from adrenaline.config import ConfigError, ModelConfig, RopeScaling

# Architectures of the Llama family: same block, differing only in flags the
# ModelConfig carries (qkv bias, tied embeddings, rope scaling).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {"attention_bias": False},
    "MistralForCausalLM": {"attention_bias": False},
    "Qwen2ForCausalLM": {"attention_bias": True},
}


class UnsupportedModelError(ConfigError):
    """The checkpoint uses an architecture or feature this engine does not implement."""


def _unsupported(feature: str, raw: dict) -> None:
    if raw.get(feature):
        raise UnsupportedModelError(f"config.json: {feature}={raw[feature]!r} is not supported")


def model_config_from_hf(raw: dict) -> ModelConfig:
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedModelError("config.json: 'architectures' is missing")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"config.json: architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UnsupportedModelError(f"config.json: hidden_act={hidden_act!r} is not supported "
                                    "(only silu)")
    # A sliding window changes which keys attention sees; we run full attention,
    # which is identical while sequences fit the window, so the window caps the
    # context instead (Qwen2 ignores its window unless use_sliding_window).
    window = raw.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window"):
        window = None
    _unsupported("mlp_bias", raw)
    n_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    # transformers v4 writes rope_theta + rope_scaling; v5 writes rope_parameters with both.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    rope_theta = (rope or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_scaling = None
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        kind = rope.get("rope_type", rope.get("type", "default"))
        fields = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k in rope}
        rope_scaling = RopeScaling(rope_type=kind, **fields)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    attention_bias = raw.get("attention_bias", SUPPORTED_ARCHITECTURES[arch]["attention_bias"])
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or hidden // n_heads,
        max_position_embeddings=min(raw.get("max_position_embeddings", 2048),
                                    window or 1 << 62),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=bool(attention_bias),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model: {model_dir!s} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model: {path} is not valid JSON: {e}") from None
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise UnsupportedModelError(f"config.json: missing required field(s) {missing}")
    return model_config_from_hf(raw)
