"""Sampling kernels (torch): temperature, top-k / top-p filtering, seeded draws."""

from __future__ import annotations

import torch


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus top-p with -inf.

    logits: [B, V] float32; top_k: [B] int64 (<= 0 or >= V means off);
    top_p: [B] float32 in (0, 1]. The highest-probability token always survives.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row; a row with its own generator is reproducible on its own."""
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    for i, gen in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor,
                    presence: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties, on logits [B, V] (a new tensor).

    prompt_mask: [B, V] bool, tokens in the prompt; output_counts: [B, V] int, each token's
    count in the output so far; repetition/frequency/presence: [B] float32. A token seen in
    the prompt or the output has its logit divided by ``repetition`` when positive and
    multiplied by it otherwise; then ``frequency * count`` and ``presence * (count > 0)``
    are subtracted.
    """
    in_output = output_counts > 0
    rep = repetition[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | in_output, penalized, logits)
    return (logits - frequency[:, None] * output_counts.to(logits.dtype)
            - presence[:, None] * in_output.to(logits.dtype))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens whose probability is below ``min_p`` times the top one's.

    logits: [B, V] (temperature already applied); min_p: [B] in [0, 1] (0 is off).
    """
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))
