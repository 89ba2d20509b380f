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
from adrenaline.kernels.ops import RotaryEmbedding, TorchOps
from adrenaline.model.linear import Linear, linear_from

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
        # q, k, v rows stacked in that order; gate, up rows likewise.
        self.qkv = Linear(h, self.q_size + 2 * self.kv_size, cfg.attention_bias, dtype, device)
        self.o = Linear(self.q_size, h, False, dtype, device)
        self.post_norm = _param(h, dtype=dtype, device=device)
        self.gate_up = Linear(h, 2 * m, False, dtype, device)
        self.down = Linear(m, h, False, dtype, device)
        self.ops = TorchOps()  # LlamaModel.use_ops swaps in fused kernels

    def pre_attention(self, hidden: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> q [T, Hq, D], k [T, Hkv, D] (both rotated), v [T, Hkv, D]."""
        cfg = self.cfg
        x = self.ops.rms_norm(hidden, self.input_norm, cfg.rms_norm_eps)
        qkv = self.qkv(x)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = hidden.shape[0]
        q = q.view(t, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = self.ops.rope(self.rope, positions, q, k)
        return q, k, v

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn_out [T, Hq, D], residual [T, H] (the layer's input) -> the layer's output [T, H].

        ``residual`` may be overwritten (fused ops add into it in place).
        """
        x, hidden = self.ops.add_rms_norm(self.o(attn_out.reshape(attn_out.shape[0], -1)),
                                          residual, self.post_norm, self.cfg.rms_norm_eps)
        return hidden + self.down(self.ops.silu_and_mul(self.gate_up(x)))


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
        self.lm_head = (linear_from(self.embed, dtype) if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: AttentionFn) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, H] (normed)."""
        hidden = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.pre_attention(hidden, positions)
            hidden = layer.post_attention(attention(i, q, k, v), hidden)
        return self.final_hidden(hidden)

    # The pieces of forward(), for callers that run attention between them (piecewise graphs).
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[0].ops.rms_norm(hidden, self.final_norm, self.cfg.rms_norm_eps)

    def use_ops(self, ops) -> None:
        """Switch every layer's elementwise ops (kernels.ops.TorchOps or a fused set)."""
        for layer in self.layers:
            layer.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def pack_weights(self) -> None:
        """Pre-pack every projection for the CPU GEMM library (no-op on GPU / float32)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
