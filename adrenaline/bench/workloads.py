"""Benchmark workloads: deterministic random prompts."""

from __future__ import annotations

import random


def random_token_prompts(num_requests: int, input_len: int, vocab_size: int, seed: int = 0
                         ) -> list[list[int]]:
    """Token-id prompts drawn uniformly from [10, vocab_size - 10), reproducible from the seed."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(input_len)]
            for _ in range(num_requests)]
