"""Greedy tokens of adrenaline.LLM equal transformers' generate on random checkpoints."""

from __future__ import annotations

import random

import pytest

from adrenaline import LLM, SamplingParams
from tests.hf_checkpoints import SHAPES, VOCAB, build_checkpoint, hf_greedy

PROMPT_LENS = [3, 9, 17, 30, 5, 44]
MAX_NEW = 12


def _prompts(seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    """(path, reference greedy outputs) for one random checkpoint shape."""
    path = tmp_path_factory.mktemp(request.param)
    model = build_checkpoint(request.param, path)
    expected = [hf_greedy(model, p, MAX_NEW) for p in _prompts()]
    return path, expected


def _generate(path, **options) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(path), dtype="float32", **options)
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert all(o.finish_reason == "length" for o in outs)
    return llm, [o.token_ids for o in outs]


def _assert_idle(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished


def test_one_continuous_batch_matches_hf(checkpoint):
    path, expected = checkpoint
    llm, got = _generate(path, block_size=8)
    assert got == expected
    _assert_idle(llm)


def test_staggered_admission_matches_hf(checkpoint):
    """A small prefill budget admits prompts over several steps while others decode."""
    path, expected = checkpoint
    llm, got = _generate(path, block_size=4, max_num_batched_tokens=32)
    assert got == expected
    _assert_idle(llm)


def test_preemption_by_recompute_matches_hf(checkpoint):
    path, expected = checkpoint
    # 96 tokens of KV for 6 prompts that grow to 15..56 tokens: decode must preempt.
    llm, got = _generate(path, block_size=4, kv_cache_tokens=96)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == expected
    _assert_idle(llm)


def test_bfloat16_agrees_with_float32_on_first_tokens(checkpoint):
    path, expected = checkpoint
    llm = LLM(str(path), dtype="bfloat16")
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0))
    first = [o.token_ids[0] for o in outs]
    assert sum(f == e[0] for f, e in zip(first, expected)) >= len(expected) - 1
    _assert_idle(llm)
