"""Fused elementwise ops on CUDA (flashinfer): the TorchOps set in fewer kernels.

One kernel each for RMSNorm, residual-add + RMSNorm, SiLU-and-mul and RoPE,
where the torch versions launch 3 to 12. They compute in float32 inside and
round once, so bf16/fp16 results differ from TorchOps (HF's arithmetic) by
rounding; float32 models keep TorchOps (EngineCore picks). flashinfer JIT-compiles
each op on first use.

In-place contract (see TorchOps): ``add_rms_norm`` leaves residual + x in
``residual`` and the normed result in ``x``; ``rope`` rotates contiguous copies
of q and k in place.
"""

from __future__ import annotations

import flashinfer
import torch

from adrenaline.kernels.ops import RotaryEmbedding


class FlashInferOps:
    name = "flashinfer"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return flashinfer.norm.rmsnorm(x.contiguous(), weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = x.contiguous(), residual.contiguous()
        flashinfer.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return flashinfer.activation.silu_and_mul(gate_up.contiguous())

    def rope(self, rotary: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor,
             k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = q.contiguous(), k.contiguous()
        t = q.shape[0]
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q.view(t, -1), k.view(t, -1), rotary.head_dim, rotary.cos_sin_f32,
            is_neox=True)
        return q, k
