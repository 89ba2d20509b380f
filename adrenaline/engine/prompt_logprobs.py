"""Prompt logprobs: each prompt token's log-probability given the tokens before it.

Computed in a prefill step from the hidden states of every prompt position (not only
the last one), with the same float32 log-softmax of the raw logits as the sampler's
``logprobs``. Entry i (i >= 1) holds prompt token i's logprob and the top-k at
position i - 1; entry 0 is None (nothing precedes the first token).

Invariant: a request asking for them is prefilled from position 0 (the scheduler
does not read the prefix cache for it, see ``Scheduler.schedule_prefill``), so its
step's rows cover the whole prompt.
"""

from __future__ import annotations

import torch

from adrenaline.engine.request import Request

CHUNK_ROWS = 512  # positions turned into [rows, vocab] logits at a time (bounds memory)


def wants_prompt_logprobs(req: Request) -> bool:
    """Does ``req``'s next prefill have to produce prompt logprobs?"""
    return req.params.prompt_logprobs is not None and req.prompt_logprobs is None


def compute_prompt_logprobs(compute_logits, hidden: torch.Tensor, requests: list[Request],
                            query_lens: list[int], context_lens: list[int]) -> None:
    """Fill ``prompt_logprobs`` / ``prompt_ranks`` of the step's requests that want them.

    ``hidden``: the step's final hidden states, [sum(query_lens), H], request by request;
    ``compute_logits``: hidden rows -> float32 logits (the model's head).
    """
    start = 0
    for req, qlen, ctx in zip(requests, query_lens, context_lens):
        rows, start = (start, start + qlen), start + qlen
        if not wants_prompt_logprobs(req):
            continue
        if ctx != 0:
            raise RuntimeError(f"{req.request_id}: prompt logprobs need a prefill from "
                               f"position 0, got one from {ctx}")
        n = req.num_prompt_tokens
        k = req.params.prompt_logprobs
        targets = torch.tensor(req.token_ids[1:n], dtype=torch.int64, device=hidden.device)
        entries: list[dict[int, float] | None] = [None]
        ranks: list[int | None] = [None]
        for lo in range(0, n - 1, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, n - 1)
            logp = compute_logits(hidden[rows[0] + lo:rows[0] + hi]).float().log_softmax(dim=-1)
            tgt = targets[lo:hi]
            tgt_lp = logp.gather(1, tgt[:, None])[:, 0]
            rank = (logp > tgt_lp[:, None]).sum(dim=-1) + 1
            top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
            tgt_l, tgt_lp_l, rank_l = tgt.tolist(), tgt_lp.tolist(), rank.tolist()
            vals_l = top_vals.tolist() if k else None
            ids_l = top_ids.tolist() if k else None
            for j in range(hi - lo):
                entry = {tgt_l[j]: tgt_lp_l[j]}
                for t, v in zip(ids_l[j] if k else (), vals_l[j] if k else ()):
                    entry.setdefault(t, v)
                entries.append(entry)
                ranks.append(rank_l[j])
        req.prompt_logprobs = entries
        req.prompt_ranks = ranks
