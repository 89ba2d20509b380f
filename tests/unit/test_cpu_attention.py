"""The CPU decode kernel (kernels/cpu_backend.py, csrc/paged_decode.cpp) against the torch
backend and float64 attention written out directly.

It reads KV pages in place; each sequence's output must be the same bits alone or in
any batch, and across block sizes, so served greedy tokens equal the offline engine's.
"""

from __future__ import annotations

import random

import pytest
import torch

from adrenaline.kernels import make_attention_backend
from adrenaline.kernels.cpu_backend import CpuAttention
from adrenaline.kernels.cpu_extension import unavailable_reason
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.kernels.torch_backend import TorchAttention

# Where the CPU lacks AVX-512, `auto` serves with the torch backend and the kernel's own
# tests cannot run (the first test below still checks that this is the reason).
needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                  reason="the CPU kernel needs AVX-512")


def test_the_kernel_builds_where_the_cpu_has_avx512():
    # Where it cannot run, the reason must be the CPU, never a failed build.
    reason = unavailable_reason()
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert reason is None
        assert isinstance(make_attention_backend("auto", torch.device("cpu"), 9, 3, 64,
                                                 torch.bfloat16), CpuAttention)
    else:
        assert reason.startswith("needs AVX-512")


def _pages(backend, num_blocks, bs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = backend.kv_cache_shape(num_blocks, bs)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


def _decode(backend, k_cache, v_cache, lens, tables, q, bs):
    meta = AttentionMetadata.build(is_prefill=False, query_lens=[1] * len(lens),
                                   context_lens=[n - 1 for n in lens], block_tables=tables,
                                   block_size=bs)
    backend.prepare(meta)
    return backend._decode(q, k_cache, v_cache, meta)


def _batch(rng, num_blocks, bs, lens):
    free = list(range(num_blocks))
    rng.shuffle(free)
    return [[free.pop() for _ in range(-(-n // bs))] for n in lens]


def _bf16_batch(seed: int, num_blocks: int, lens: list[int] | None = None, num_seqs: int = 0,
                longest: int = 0):
    """SmolLM2's heads over random bfloat16 pages of 16-token blocks: (backend, k_cache,
    v_cache, lens, tables, q); ``lens`` given, or ``num_seqs`` drawn up to ``longest``."""
    rng = random.Random(seed)
    backend = CpuAttention(9, 3, 64)
    k_cache, v_cache = _pages(backend, num_blocks, 16, torch.bfloat16, seed=seed)
    lens = lens or [rng.randint(20, longest) for _ in range(num_seqs)]
    tables = _batch(rng, num_blocks, 16, lens)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return backend, k_cache, v_cache, lens, tables, q


def _reference(q, k_cache, v_cache, table, n, hkv):
    """float64 softmax(q k^T / sqrt(d)) v over the sequence's first n keys."""
    hq, d = q.shape
    keys = k_cache[:, table].reshape(hkv, -1, d)[:, :n].double()
    vals = v_cache[:, table].reshape(hkv, -1, d)[:, :n].double()
    qh = q.double().view(hkv, hq // hkv, d)
    return (torch.softmax(qh @ keys.transpose(-1, -2) * d ** -0.5, dim=-1) @ vals).reshape(hq, d)


@needs_kernel
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (32, 4, 128), (4, 4, 64)])
@pytest.mark.parametrize("bs", [16, 64, 256])
def test_matches_attention_written_out_in_float32(hq, hkv, d, bs):
    rng = random.Random(bs + d)
    backend = CpuAttention(hq, hkv, d)
    k_cache, v_cache = _pages(backend, 4096 // bs * 8, bs, torch.float32, seed=d)
    lens = [1, 2, 127, 128, 129, 300, 1000, 2049][: 8]
    tables = _batch(rng, 4096 // bs * 8, bs, lens)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    out = _decode(backend, k_cache, v_cache, lens, tables, q, bs)
    torch_out = _decode(TorchAttention(hq, hkv, d), k_cache, v_cache, lens, tables, q, bs)
    for i, n in enumerate(lens):
        ref = _reference(q[i], k_cache, v_cache, tables[i], n, hkv)
        assert torch.allclose(out[i].double(), ref, atol=2e-5, rtol=1e-4), (i, n)
        assert torch.allclose(out[i], torch_out[i], atol=2e-5, rtol=1e-4), (i, n)


@needs_kernel
def test_bfloat16_matches_the_torch_backend_within_rounding():
    backend, k_cache, v_cache, lens, tables, q = _bf16_batch(0, 3600, num_seqs=24, longest=2300)
    out = _decode(backend, k_cache, v_cache, lens, tables, q, 16)
    torch_out = _decode(TorchAttention(9, 3, 64), k_cache, v_cache, lens, tables, q, 16)
    for i, n in enumerate(lens):
        ref = _reference(q[i], k_cache, v_cache, tables[i], n, 3)
        # bfloat16 output: 8 bits of mantissa, about 4e-3 relative.
        assert torch.allclose(out[i].double(), ref, atol=4e-3, rtol=8e-3), (i, n)
        assert torch.allclose(out[i].float(), torch_out[i].float(), atol=8e-3, rtol=1.6e-2), i


@needs_kernel
def test_each_sequence_gets_the_same_bits_alone_in_any_batch_and_at_any_block_size():
    rng = random.Random(1)
    hq, hkv, d = 9, 3, 64
    lens = [rng.randint(20, 2300) for _ in range(12)]
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    # The same keys and values laid out in pages of 16 and of 64 tokens.
    backend = CpuAttention(hq, hkv, d)
    dense_k, dense_v = (torch.randn(hkv, sum(lens), d, generator=torch.Generator().manual_seed(s))
                        .to(torch.bfloat16) for s in (4, 5))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    outs = {}
    for bs in (16, 64):
        tables = _batch(rng, sum(-(-n // bs) for n in lens) + 8, bs, lens)
        k_cache, v_cache = _pages(backend, sum(-(-n // bs) for n in lens) + 8, bs,
                                  torch.bfloat16, seed=9)
        for table, start, n in zip(tables, starts, lens):
            for j, block in enumerate(table):
                m = min(bs, n - j * bs)
                k_cache[:, block, :m] = dense_k[:, start + j * bs:start + j * bs + m]
                v_cache[:, block, :m] = dense_v[:, start + j * bs:start + j * bs + m]
        outs[bs] = _decode(backend, k_cache, v_cache, lens, tables, q, bs)
        for i, n in enumerate(lens):
            alone = _decode(backend, k_cache, v_cache, [n], [tables[i]], q[i:i + 1], bs)
            assert torch.equal(outs[bs][i], alone[0]), (bs, i)
        for i in (0, 5, 11):  # and with another batch beside it
            pair = [i, (i + 3) % len(lens)]
            two = _decode(backend, k_cache, v_cache, [lens[j] for j in pair],
                          [tables[j] for j in pair], q[pair], bs)
            assert torch.equal(two[0], outs[bs][i]), (bs, i)
    assert torch.equal(outs[16], outs[64])


@needs_kernel
def test_a_thread_count_changes_no_bit():
    backend, k_cache, v_cache, lens, tables, q = _bf16_batch(2, 800, num_seqs=8, longest=1500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _decode(backend, k_cache, v_cache, lens, tables, q, 16)
        torch.set_num_threads(2)
        two = _decode(backend, k_cache, v_cache, lens, tables, q, 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_unsupported_heads_and_dtypes_are_refused_by_name_and_auto_falls_back():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="head_dim 80"):
        make_attention_backend("cpu", cpu, 8, 8, 80, torch.float32)
    with pytest.raises(ValueError, match="at most 8 per group"):
        make_attention_backend("cpu", cpu, 32, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="float16"):
        make_attention_backend("cpu", cpu, 8, 8, 64, torch.float16)
    for shape, dtype in (((8, 8, 80), torch.float32), ((8, 8, 64), torch.float16)):
        backend = make_attention_backend("auto", cpu, *shape, dtype)
        assert type(backend) is TorchAttention


@needs_kernel
def test_the_kernel_runs_without_the_gil():
    # Two threads call it, each timing its calls from Python. Holding the GIL, a call
    # would keep the other thread from even reading the clock until it returned, so no
    # two calls' intervals could overlap; released, they run at the same time.
    import threading
    import time

    backend, k_cache, v_cache, lens, tables, q = _bf16_batch(3, 2000, lens=[1000] * 16)
    meta = AttentionMetadata.build(is_prefill=False, query_lens=[1] * 16,
                                   context_lens=[n - 1 for n in lens], block_tables=tables,
                                   block_size=16)
    backend.prepare(meta)
    spans: dict[int, list[tuple[float, float]]] = {0: [], 1: []}

    def attend(i):
        for _ in range(10):
            start = time.perf_counter()
            backend._decode(q, k_cache, v_cache, meta)
            spans[i].append((start, time.perf_counter()))

    threads = [threading.Thread(target=attend, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans[0] for b0, b1 in spans[1])


@needs_kernel
def test_a_sequence_longer_than_its_table_is_refused():
    # The kernel reads block ids from the table up to each length: a length past the
    # table would read whatever follows it as block ids.
    from adrenaline.kernels.cpu_extension import paged_decode_module

    backend, k_cache, v_cache, lens, tables, q = _bf16_batch(4, 64, lens=[40, 20])
    table = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    kernel = paged_decode_module().paged_decode
    ok = kernel(q, k_cache, v_cache, table, torch.tensor([48, 20]), 0.125)
    assert ok.shape == q.shape
    for bad in ([49, 20], [40, 0]):
        with pytest.raises(RuntimeError, match="its table holds 1 to 48"):
            kernel(q, k_cache, v_cache, table, torch.tensor(bad), 0.125)
