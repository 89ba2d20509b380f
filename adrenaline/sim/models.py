"""What the cost model needs of a model: bytes and FLOPs per step, KV bytes per token.

Any HF config.json (through the engine's own parser, so the same models are
accepted), or a built-in config: the paper's Llama-2 7B and 13B, Llama-3 8B,
the project's built-in ``tiny``/``small`` and gpu_check's 1B model. No weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adrenaline.config import ModelConfig
from adrenaline.model.builtin import BUILTINS
from adrenaline.model.hf_config import model_config_from_hf

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}

# Published config.json fields of each model (architecture facts only).
CONFIGS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, torch_dtype="float16"),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096, torch_dtype="float16"),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16"),
    # The model of `python -m adrenaline.bench gpu-check` (bench/gpu_check.py MODEL_1B).
    "gpu-check-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=4096, torch_dtype="bfloat16"),
    **BUILTINS,
}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ModelConfig
    dtype_bytes: int

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def layer_params(self) -> int:
        c = self.config
        q = c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        return (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
                + 2 * c.hidden_size)  # + the two RMSNorm weights

    @property
    def params(self) -> int:
        c = self.config
        embed = c.vocab_size * c.hidden_size
        return (self.layers * self.layer_params + embed * (1 if c.tie_word_embeddings else 2)
                + c.hidden_size)  # + the final norm

    @property
    def step_weight_bytes(self) -> int:
        """Weights one forward step reads (layers and the LM head; the embedding is gathered)."""
        c = self.config
        return (self.layers * self.layer_params + c.vocab_size * c.hidden_size) * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * self.layers * c.num_key_value_heads * c.head_dim * self.dtype_bytes

    @property
    def linear_flops_per_token(self) -> int:
        c = self.config
        return 2 * (self.layers * self.layer_params + c.vocab_size * c.hidden_size)

    def attention_flops(self, query: int, context: int) -> float:
        """QK^T and PV of ``query`` new tokens over ``context`` cached ones (causal)."""
        c = self.config
        pairs = query * context + query * (query + 1) / 2
        return 4.0 * self.layers * c.num_attention_heads * c.head_dim * pairs


def load_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """A built-in name (see CONFIGS), or a directory / file holding an HF config.json."""
    if name_or_path in CONFIGS:
        name, raw = name_or_path, {**_LLAMA, **CONFIGS[name_or_path]}
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {name_or_path!r} is neither a built-in config "
                             f"({', '.join(CONFIGS)}) nor a path to an HF config.json")
        name, raw = path.parent.name, json.loads(path.read_text())
    config = model_config_from_hf(raw)
    dtype = dtype or config.torch_dtype
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    return ModelSpec(name=name, config=config, dtype_bytes=_DTYPE_BYTES[dtype])
