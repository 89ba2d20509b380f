"""Read a GGUF file (llama.cpp's format) as an HF config dict and HF-named float32 tensors.

Through the `gguf` package (maintained with llama.cpp): its reader for the
metadata and tensor data, its ``quants.dequantize`` for the supported types.
llama.cpp's converter permutes the rows of Llama/Mistral q and k weights (its
RoPE pairs dimensions i, i+1; HF's pairs i, i+d/2); ``_unpermute`` undoes it,
so the tensors here are exactly what an HF checkpoint of the model holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from adrenaline.config import ConfigError

# GGUF general.architecture -> (HF architecture, HF model_type, q/k rows permuted by llama.cpp).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_IN_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


class GGUFFile:
    """One open GGUF file: ``metadata`` (key -> python value) and its tensors."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:  # bad magic, truncated file, unreadable
            raise ConfigError(f"model: {self.path} is not a readable GGUF file: {e}") from None
        self.metadata = {k: f.contents() for k, f in self._reader.fields.items()
                         if not k.startswith("GGUF.")}

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise ConfigError(f"model: {self.path} lacks GGUF metadata {key!r}")
        return self.metadata[key]

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"model: {self.path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCHITECTURES)})")
        return arch

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def hf_config(self) -> dict:
        """The config.json an HF checkpoint of this model has."""
        arch = self.architecture
        hf_arch, model_type, _ = ARCHITECTURES[arch]

        def key(name: str, default=None):
            return self.get(f"{arch}.{name}", default)

        hidden = self.require(f"{arch}.embedding_length")
        heads = self.require(f"{arch}.attention.head_count")
        vocab = key("vocab_size") or len(self.require("tokenizer.ggml.tokens"))
        config = {
            "architectures": [hf_arch], "model_type": model_type, "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.require(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self.require(f"{arch}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv") or heads,
            "head_dim": key("attention.key_length") or key("rope.dimension_count")
            or hidden // heads,
            "vocab_size": vocab,
            "max_position_embeddings": key("context_length", 2048),
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": key("rope.freq_base", 10000.0),
            "rope_scaling": self._rope_scaling(arch),
            "attention_bias": arch == "qwen2",
            # No output.weight: the head is the embedding (llama.cpp writes it once).
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "torch_dtype": "float32",
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
        }
        if key("attention.sliding_window"):
            config["sliding_window"] = key("attention.sliding_window")
        return config

    def _rope_scaling(self, arch: str) -> dict | None:
        if "rope_freqs.weight" in self.tensor_names:
            raise ConfigError(f"model: {self.path}: per-dimension RoPE factors (rope_freqs) are "
                              "not supported")
        kind = self.get(f"{arch}.rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": self.require(f"{arch}.rope.scaling.factor")}
        raise ConfigError(f"model: {self.path}: RoPE scaling {kind!r} is not supported "
                          "(none, linear)")

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every tensor, dequantized, q/k rows un-permuted."""
        arch = self.architecture
        cfg = self.hf_config()
        permuted = ARCHITECTURES[arch][2]
        for t in self._reader.tensors:
            name = hf_name(t.name, self.path)
            values = dequantize(t, self.path)
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                values = _unpermute(values, cfg["num_attention_heads"])
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                values = _unpermute(values, cfg["num_key_value_heads"])
            yield name, torch.from_numpy(np.ascontiguousarray(values))


def hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _IN_BLOCK:
        return f"model.layers.{m.group(1)}.{_IN_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ConfigError(f"model: {path}: unexpected GGUF tensor {gguf_name!r}")


def dequantize(tensor, path: Path | str = "<gguf>") -> np.ndarray:
    """A reader tensor as float32, shaped [rows, cols] (GGUF lists dims innermost first)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"model: {path}: tensor {tensor.name!r} has GGUF type {kind}, which is "
                          f"not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order within each head: [pairs, 2] -> [2, pairs] (rows of d/2)."""
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
