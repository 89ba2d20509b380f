"""Decode attention on CPU split into groups of similar lengths (kernels/torch_backend.py).

A batch padded to its longest sequence costs batch x longest; grouping makes it cost
about the sum of the lengths. Each sequence's output must not depend on its group,
its padding or its batch: bit for bit in bfloat16, so that served tokens equal the
offline engine's whatever the batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.kernels.torch_backend import GROUP_COST_TOKENS, TorchAttention, length_groups

HQ, HKV, D, BS = 9, 3, 64, 16


def test_length_groups_split_by_padding_saved_against_group_cost():
    # Equal lengths: one group, whatever the cost.
    assert length_groups([8, 8, 8], 1) == [[0, 1, 2]]
    # Two clusters far apart: two groups when padding the short ones costs more than a group.
    assert sorted(length_groups([100, 2, 100, 3], 10)) == [[0, 2], [1, 3]]
    assert length_groups([100, 2, 100, 3], 1000) == [[0, 1, 2, 3]]  # a group costs too much
    # Always a partition of the rows.
    lens = [random.Random(s).randint(1, 150) for s in range(40)]
    groups = length_groups(lens, GROUP_COST_TOKENS / BS)
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert 1 < len(groups) < 40


def _step(backend, k_cache, v_cache, lens, tables, q):
    meta = AttentionMetadata.build(is_prefill=False, query_lens=[1] * len(lens),
                                   context_lens=[n - 1 for n in lens], block_tables=tables,
                                   block_size=BS)
    backend.prepare(meta)
    return backend._decode(q, k_cache, v_cache, meta), meta


def test_each_sequence_gets_the_same_bits_alone_and_in_any_group():
    torch.manual_seed(0)
    rng = random.Random(0)
    backend = TorchAttention(HQ, HKV, D)
    num_blocks = 3600
    k_cache = torch.randn(backend.kv_cache_shape(num_blocks, BS)).to(torch.bfloat16)
    v_cache = torch.randn(backend.kv_cache_shape(num_blocks, BS)).to(torch.bfloat16)
    lens = [rng.randint(20, 2300) for _ in range(24)]
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = []
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // BS))])
    q = torch.randn(len(lens), HQ, D).to(torch.bfloat16)
    out, meta = _step(backend, k_cache, v_cache, lens, tables, q)
    assert len(meta.backend_state.groups) > 1  # lengths 20..2300 split
    for i, n in enumerate(lens):
        alone, _ = _step(backend, k_cache, v_cache, [n], [tables[i]], q[i:i + 1])
        assert torch.equal(out[i], alone[0]), i
    # And against float32 attention written out directly.
    for i in (0, 7, 23):
        keys = k_cache[:, tables[i]].reshape(HKV, -1, D)[:, :lens[i]].float()
        vals = v_cache[:, tables[i]].reshape(HKV, -1, D)[:, :lens[i]].float()
        qi = q[i].float().view(HKV, HQ // HKV, D)
        ref = torch.softmax(qi @ keys.transpose(-1, -2) * D ** -0.5, dim=-1) @ vals
        assert torch.allclose(out[i].float(), ref.reshape(HQ, D), atol=2e-2), i


def test_padding_within_a_group_changes_no_bit():
    # A sequence padded to a longer one beside it (one group) against itself alone, over
    # lengths where a reduction over the padded length rounds differently (found on SmolLM2's
    # shapes: 7 of these 458 pairs differed when softmax and probs x values ran over it).
    torch.manual_seed(0)
    backend = TorchAttention(HQ, HKV, D)
    k_cache = torch.randn(backend.kv_cache_shape(400, BS)).to(torch.bfloat16)
    v_cache = torch.randn(backend.kv_cache_shape(400, BS)).to(torch.bfloat16)
    differing = []
    for n in range(700, 1300, 37):
        table = list(range(1, 1 + -(-n // BS)))
        q = torch.randn(1, HQ, D).to(torch.bfloat16)
        alone, _ = _step(backend, k_cache, v_cache, [n], [table], q)
        for m in range(n + 1, 2400, 53):
            other = list(range(200, 200 + -(-m // BS)))
            pair = torch.cat([q, torch.randn(1, HQ, D).to(torch.bfloat16)])
            out, _ = _step(backend, k_cache, v_cache, [n, m], [table, other], pair)
            if not torch.equal(out[0], alone[0]):
                differing.append((n, m))
    assert differing == []
