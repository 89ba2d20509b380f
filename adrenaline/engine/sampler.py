"""Turn a step's last-token logits into next tokens, per each request's SamplingParams."""

from __future__ import annotations

import torch

from adrenaline.engine.logits_processors import process_logits
from adrenaline.engine.request import Request
from adrenaline.kernels.sampling import apply_min_p, apply_top_k_top_p, sample_from_probs


_MASK = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draw for the token at ``position`` (its index in
    prompt + output). A pure function of (seed, position), so the draw does not depend on
    how the request got there: a rerun from prompt + produced tokens after a recovery, a
    preemption by recompute, or a handoff between workers draws exactly as a single
    uninterrupted run would (splitmix64 finalizer: nearby inputs give unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


class Sampler:
    def __init__(self, seed: int = 0):
        # Draws for requests without their own seed come from this engine-wide stream.
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits: [B, V] float32, row i for requests[i] -> (token ids, per-row logprobs)."""
        if logits.device.type != "cpu" and all(
                r.params.greedy and r.params.logprobs is None and not r.params.processes_logits
                for r in requests):
            # Greedy on an accelerator: only B token ids cross to the host, not B x V logits.
            return logits.argmax(dim=-1).tolist(), [None] * len(requests)
        logits = logits.cpu()  # raw: logprobs come from these
        processed = (process_logits(logits, requests)
                     if any(r.params.processes_logits for r in requests) else logits)
        tokens = processed.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            params = [requests[i].params for i in sampled_rows]
            temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
            scaled = processed[rows] / temps[:, None]
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
            if bool((min_p > 0).any()):
                scaled = apply_min_p(scaled, min_p)
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
            if bool((top_k > 0).any() or (top_p < 1).any()):
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)
            gens = []
            for i in sampled_rows:
                r = requests[i]
                if r.generator is None:
                    gens.append(self.generator)
                else:  # the next token's position: len(prompt + output so far)
                    gens.append(r.generator.manual_seed(position_seed(r.params.seed,
                                                                      r.num_tokens)))
            tokens[rows] = sample_from_probs(probs, gens)
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, requests, token_list)

    @staticmethod
    def _logprobs(logits: torch.Tensor, requests: list[Request], tokens: list[int]
                  ) -> list[dict[int, float] | None]:
        want = [r.params.logprobs for r in requests]
        if all(n is None for n in want):
            return [None] * len(requests)
        logp = logits.log_softmax(dim=-1)
        k = max(n or 0 for n in want)
        top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        out: list[dict[int, float] | None] = []
        for i, n in enumerate(want):
            if n is None:
                out.append(None)
                continue
            entry = {tokens[i]: float(logp[i, tokens[i]])}
            for j in range(n):
                entry.setdefault(int(top_ids[i, j]), float(top_vals[i, j]))
            out.append(entry)
        return out
