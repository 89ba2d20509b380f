"""Per-request logits processors before temperature: structured-output mask, min_tokens,
logit_bias, penalties (semantics and order in SamplingParams' docstring).

Everything they read is the request's own state (its prompt and output tokens, its grammar
state), so any worker that samples the request's next token applies the same ones.
"""

from __future__ import annotations

import torch

from adrenaline.engine.grammar import apply_grammar_masks
from adrenaline.engine.request import Request
from adrenaline.kernels.sampling import apply_penalties


def process_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """logits: [B, V] float32 on the CPU, row i for requests[i] -> the processed logits."""
    vocab = logits.shape[-1]
    logits = logits.clone()
    grammar_rows = [(i, r.grammar) for i, r in enumerate(requests) if r.grammar is not None]
    if grammar_rows:
        apply_grammar_masks(logits, grammar_rows)
    for i, r in enumerate(requests):
        p = r.params
        if p.min_tokens and r.num_output_tokens < p.min_tokens:
            ids = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < vocab]
            row = logits[i].index_fill(0, torch.tensor(ids, dtype=torch.int64), float("-inf"))
            if not torch.isneginf(row).all():  # a grammar that allows only a stop token wins
                logits[i] = row
        for tok, bias in p.logit_bias:
            if tok < vocab:
                logits[i, tok] += bias
    rows = [i for i, r in enumerate(requests) if r.params.has_penalties]
    if rows:
        prompt_mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
        counts = torch.zeros(len(rows), vocab, dtype=torch.int64)
        for j, i in enumerate(rows):
            r = requests[i]
            prompt_mask[j, torch.tensor(r.prompt_token_ids, dtype=torch.int64)] = True
            out = r.output_token_ids
            if out:
                counts[j] = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=vocab)
        params = [requests[i].params for i in rows]
        index = torch.tensor(rows)
        logits[index] = apply_penalties(
            logits[index], prompt_mask, counts,
            torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
            torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
            torch.tensor([p.presence_penalty for p in params], dtype=torch.float32))
    return logits
