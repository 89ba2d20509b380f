"""The Llama family (Llama 2/3, Mistral, Qwen2) in plain torch.

Each decoder layer is split in three so attention can run elsewhere:
pre_attention (norm, fused QKV projection, RoPE) -> attention (an injected
callable: the kernels API, or a local/remote split) -> post_attention
(output projection, residual, norm, MLP, residual). The model knows nothing
of scheduling; tokens of all sequences in a step are flattened into one
[num_tokens] batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adrenaline.config import ModelConfig
from adrenaline.kernels.ops import RotaryEmbedding, rms_norm

# attention(layer_index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype: torch.dtype, device):
        super().__init__()
        self.cfg = cfg
        self.rope = rope
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = hq * d, hkv * d
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.input_norm = _param(h, dtype=dtype, device=device)
        self.qkv_weight = _param(self.q_size + 2 * self.kv_size, h, dtype=dtype, device=device)
        self.qkv_bias = (_param(self.q_size + 2 * self.kv_size, dtype=dtype, device=device)
                         if cfg.attention_bias else None)
        self.o_weight = _param(h, self.q_size, dtype=dtype, device=device)
        self.post_norm = _param(h, dtype=dtype, device=device)
        self.gate_up_weight = _param(2 * m, h, dtype=dtype, device=device)
        self.down_weight = _param(h, m, dtype=dtype, device=device)

    def pre_attention(self, hidden: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> q [T, Hq, D], k [T, Hkv, D] (both rotated), v [T, Hkv, D]."""
        cfg = self.cfg
        x = rms_norm(hidden, self.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.view(t, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = self.rope(positions, q, k)
        return q, k, v

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn_out [T, Hq, D], residual [T, H] (the layer's input) -> the layer's output [T, H]."""
        hidden = residual + F.linear(attn_out.reshape(attn_out.shape[0], -1), self.o_weight)
        x = rms_norm(hidden, self.post_norm, self.cfg.rms_norm_eps)
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, self.down_weight)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                    dtype, device)
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rope, dtype, device)
                                    for _ in range(cfg.num_hidden_layers))
        self.final_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = (self.embed if cfg.tie_word_embeddings
                        else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: AttentionFn) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, H] (normed)."""
        hidden = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.pre_attention(hidden, positions)
            hidden = layer.post_attention(attention(i, q, k, v), hidden)
        return rms_norm(hidden, self.final_norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head).float()
