"""Load a Llama-family model from a local HF-format directory (config.json + *.safetensors)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from adrenaline.config import ConfigError, ModelConfig
from adrenaline.model.llama import LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF name within a layer -> (our parameter, row slice index in a fused weight or None).
_FUSED = {
    "self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1), "self_attn.v_proj": ("qkv", 2),
    "mlp.gate_proj": ("gate_up", 0), "mlp.up_proj": ("gate_up", 1),
}
_PLAIN = {
    "self_attn.o_proj.weight": "o.weight", "mlp.down_proj.weight": "down.weight",
    "input_layernorm.weight": "input_norm", "post_attention_layernorm.weight": "post_norm",
}
# A fused parameter is complete once this many checkpoint tensors were copied into it.
_PIECES = {"qkv.weight": 3, "qkv.bias": 3, "gate_up.weight": 2}
# Buffers some checkpoints carry that we recompute.
_IGNORED = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto" takes the checkpoint's dtype, except float16 on CPU becomes bfloat16."""
    if dtype == "auto":
        dtype = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float32"
        if dtype == "float16" and device.type == "cpu":
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _fused_rows(cfg: ModelConfig, kind: str) -> list[int]:
    if kind == "qkv":
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        return [0, q, q + kv]
    return [0, cfg.intermediate_size]


def load_model(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int) -> LlamaModel:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model: {model_dir!s} has no *.safetensors files")
    model = LlamaModel(cfg, dtype, device, max_positions)
    # named_parameters() lists a tied lm_head once, as "embed".
    expected = {n for n, _ in model.named_parameters()}
    pieces: Counter[str] = Counter()  # our parameter -> checkpoint tensors copied into it
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    target = _assign(model, cfg, name, f.get_tensor(name))
                    if target:
                        pieces[target] += 1
    loaded = {n for n, c in pieces.items() if c == _PIECES.get(n.split(".", 2)[-1], 1)}
    missing = sorted(expected - loaded)
    if missing:
        raise ConfigError(f"model: checkpoint in {model_dir!s} lacks weights for {missing[:8]}")
    model.pack_weights()
    return model


def _assign(model: LlamaModel, cfg: ModelConfig, name: str, tensor: torch.Tensor) -> str | None:
    """Copy one checkpoint tensor into place; return the name of our parameter it fed."""
    if name.endswith(_IGNORED):
        return None
    if name == "model.embed_tokens.weight":
        model.embed.copy_(tensor)
        return "embed"
    if name == "model.norm.weight":
        model.final_norm.copy_(tensor)
        return "final_norm"
    if name == "lm_head.weight":
        if cfg.tie_word_embeddings:
            return None  # same values as the embedding
        model.lm_head.weight.copy_(tensor)
        return "lm_head.weight"
    m = _LAYER.match(name)
    if not m:
        raise ConfigError(f"model: unexpected weight {name!r} in checkpoint")
    idx, rest = int(m.group(1)), m.group(2)
    if idx >= cfg.num_hidden_layers:
        raise ConfigError(f"model: weight {name!r} is past num_hidden_layers={cfg.num_hidden_layers}")
    layer = model.layers[idx]
    prefix = f"layers.{idx}."
    if rest in _PLAIN:
        layer.get_parameter(_PLAIN[rest]).copy_(tensor)
        return prefix + _PLAIN[rest]
    module, _, kind = rest.rpartition(".")
    if module in _FUSED and kind in ("weight", "bias"):
        fused, piece = _FUSED[module]
        param = getattr(getattr(layer, fused), kind)
        if param is None:
            raise ConfigError(f"model: weight {name!r} has a bias the config does not declare")
        rows = _fused_rows(cfg, fused)
        param[rows[piece]:rows[piece] + tensor.shape[0]].copy_(tensor)
        return prefix + f"{fused}.{kind}"
    raise ConfigError(f"model: unexpected weight {name!r} in checkpoint")

