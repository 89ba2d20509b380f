"""FlashInfer backend: layout and page-table checks run anywhere; kernel parity needs CUDA.

The CUDA tests build both backends' caches from one logical per-slot KV (flat slot
s = block * block_size + offset), run the same step through FlashInferAttention on
the GPU and TorchAttention on the CPU in float32, and compare outputs and pages.
"""

from __future__ import annotations

import random

import pytest
import torch

from adrenaline.kernels import make_attention_backend
from adrenaline.kernels.base import AttentionBackend
from adrenaline.kernels.flashinfer_backend import FlashInferAttention
from adrenaline.kernels.metadata import AttentionMetadata
from adrenaline.kernels.torch_backend import TorchAttention

BLOCK = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- layout helpers: TorchAttention pages [Hkv, NB, bs, D] <-> NHD pages [NB, bs, Hkv, D]

def torch_to_nhd(cache: torch.Tensor) -> torch.Tensor:
    return cache.permute(1, 2, 0, 3).contiguous()


def nhd_to_torch(cache: torch.Tensor) -> torch.Tensor:
    return cache.permute(2, 0, 1, 3).contiguous()


def _cpu_backend(num_heads: int, num_kv_heads: int, head_dim: int) -> FlashInferAttention:
    """An instance with no CUDA state, enough for kv_cache_shape / prepare / write_kv."""
    fi = object.__new__(FlashInferAttention)
    AttentionBackend.__init__(fi, num_heads, num_kv_heads, head_dim)
    fi.device, fi.dtype, fi._live = torch.device("cpu"), None, {False: None, True: None}
    return fi


def _scenario(specs: list[tuple[int, int]], num_blocks: int, seed: int
              ) -> tuple[list[list[int]], list[int], list[int]]:
    """Disjoint, shuffled block lists for (context_len, query_len) sequences."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for ctx, q in specs:
        n = -(-(ctx + q) // BLOCK)
        tables.append([free.pop() for _ in range(n)])
    return tables, [c for c, _ in specs], [q for _, q in specs]


# ---- CPU-safe tests

def test_module_imports_and_layout_is_nhd():
    fi = _cpu_backend(8, 2, 64)
    assert fi.kv_cache_shape(10, BLOCK) == (10, BLOCK, 2, 64)
    with pytest.raises(ValueError):
        FlashInferAttention(8, 2, 64, device=torch.device("cpu"))
    with pytest.raises(ValueError):
        make_attention_backend("flashinfer", torch.device("cpu"), 8, 2, 64)


def test_prepare_builds_csr_page_table():
    fi = _cpu_backend(4, 2, 8)
    specs = [(0, 5), (16, 1), (20, 13), (31, 1)]  # seq lens 5, 17, 33, 32
    tables, ctx, qlens = _scenario(specs, 40, seed=0)
    meta = AttentionMetadata.build(is_prefill=True, query_lens=qlens, context_lens=ctx,
                                   block_tables=tables, block_size=BLOCK)
    fi.prepare(meta)
    st = meta.backend_state
    assert st.qo_indptr.tolist() == [0, 5, 6, 19, 20]
    assert st.kv_indptr.tolist() == [0, 1, 3, 6, 8]
    assert st.kv_indices.tolist() == [b for t in tables for b in t]
    assert st.kv_last_page_len.tolist() == [5, 1, 1, 16]
    assert st.kv_indices.dtype == st.kv_indptr.dtype == torch.int32


def test_write_kv_matches_torch_layout():
    hkv, d, nb = 2, 8, 6
    fi, ref = _cpu_backend(4, hkv, d), TorchAttention(4, hkv, d)
    slots = torch.tensor([3, 17, 40, 95, 64], dtype=torch.int64)
    k, v = torch.randn(5, hkv, d), torch.randn(5, hkv, d)
    kc_ref, vc_ref = torch.zeros(hkv, nb, BLOCK, d), torch.zeros(hkv, nb, BLOCK, d)
    kc, vc = torch.zeros(fi.kv_cache_shape(nb, BLOCK)), torch.zeros(fi.kv_cache_shape(nb, BLOCK))
    ref.write_kv(k, v, kc_ref, vc_ref, slots)
    fi.write_kv(k, v, kc, vc, slots)
    assert torch.equal(nhd_to_torch(kc), kc_ref) and torch.equal(nhd_to_torch(vc), vc_ref)
    assert torch.equal(kc.view(-1, hkv, d)[slots], k) and torch.equal(vc.view(-1, hkv, d)[slots], v)


# ---- CUDA parity against TorchAttention

HEADS = [(8, 8), (8, 2), (16, 2)]  # GQA group sizes 1, 4, 8
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]  # select with -k (e.g. -k "not fp16")
TOL = 2e-2


class _Step:
    """One step's inputs, held once in float32 (already rounded to the GPU dtype)."""

    def __init__(self, specs, is_prefill, hq, hkv, d, dtype, num_blocks, seed):
        g = torch.Generator().manual_seed(seed)
        self.tables, self.ctx, self.qlens = _scenario(specs, num_blocks, seed)
        self.is_prefill, self.dtype = is_prefill, dtype
        t = sum(self.qlens)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).float()
        self.q, self.k, self.v = rnd(t, hq, d), rnd(t, hkv, d), rnd(t, hkv, d)

    def meta(self, device) -> AttentionMetadata:
        return AttentionMetadata.build(is_prefill=self.is_prefill, query_lens=self.qlens,
                                       context_lens=self.ctx, block_tables=self.tables,
                                       block_size=BLOCK, device=device)


def _check_step(fi, ref, step, fi_caches, ref_caches):
    """Run one step on both backends over every layer's caches; compare outputs and pages."""
    dev, dt = fi.device, step.dtype
    m_fi, m_ref = step.meta(dev), step.meta("cpu")
    fi.prepare(m_fi)
    ref.prepare(m_ref)
    for (kc, vc), (kr, vr) in zip(fi_caches, ref_caches):
        out = fi.forward(step.q.to(dev, dt), step.k.to(dev, dt), step.v.to(dev, dt), kc, vc, m_fi)
        exp = ref.forward(step.q, step.k, step.v, kr, vr, m_ref)
        assert out.dtype == dt and out.shape == exp.shape
        torch.testing.assert_close(out.float().cpu(), exp, atol=TOL, rtol=TOL)
        # The append: the pages hold exactly the written k/v at the step's slots, in both layouts.
        assert torch.equal(nhd_to_torch(kc).float().cpu(), kr)
        assert torch.equal(nhd_to_torch(vc).float().cpu(), vr)
        slots = m_fi.slot_mapping
        assert torch.equal(kc.view(-1, fi.num_kv_heads, fi.head_dim)[slots].float().cpu(), step.k)


def _setup(hq, hkv, d, dtype, num_blocks, layers=1, seed=0):
    fi = FlashInferAttention(hq, hkv, d, device=torch.device("cuda"))
    ref = TorchAttention(hq, hkv, d)
    g = torch.Generator().manual_seed(seed + 1000)
    fi_caches, ref_caches = [], []
    for _ in range(layers):
        # One logical per-slot KV; the reference keeps it in float32, FlashInfer in dtype.
        kr = torch.randn(hkv, num_blocks, BLOCK, d, generator=g).to(dtype).float()
        vr = torch.randn(hkv, num_blocks, BLOCK, d, generator=g).to(dtype).float()
        ref_caches.append((kr, vr))
        fi_caches.append(tuple(torch_to_nhd(c).to("cuda", dtype) for c in (kr, vr)))
        assert fi_caches[-1][0].shape == fi.kv_cache_shape(num_blocks, BLOCK)
    return fi, ref, fi_caches, ref_caches


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_decode_matches_torch(hq, hkv, d, dtype):
    fi, ref, fc, rc = _setup(hq, hkv, d, dtype, num_blocks=64)
    specs = [(0, 1), (1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (257, 1)]
    _check_step(fi, ref, _Step(specs, False, hq, hkv, d, dtype, 64, seed=1), fc, rc)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("specs", [
    [(0, 1), (0, 7), (0, 16), (0, 33), (0, 100)],  # ragged fresh prompts
    [(0, 5), (16, 10), (20, 1), (37, 40), (5, 5), (5, 5)],  # with cached context
], ids=["fresh", "context"])
def test_prefill_matches_torch(specs, hq, hkv, d, dtype):
    fi, ref, fc, rc = _setup(hq, hkv, d, dtype, num_blocks=64)
    _check_step(fi, ref, _Step(specs, True, hq, hkv, d, dtype, 64, seed=2), fc, rc)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wrapper_reuse_across_steps_and_layers(dtype):
    hq, hkv, d, nb = 16, 4, 128, 96
    fi, ref, fc, rc = _setup(hq, hkv, d, dtype, num_blocks=nb, layers=2)
    steps = [
        _Step([(0, 30), (0, 3)], True, hq, hkv, d, dtype, nb, seed=3),
        _Step([(30, 1), (3, 1)], False, hq, hkv, d, dtype, nb, seed=4),
        _Step([(40, 1), (7, 1), (64, 1), (0, 1)], False, hq, hkv, d, dtype, nb, seed=5),
        _Step([(12, 20), (0, 9), (50, 1)], True, hq, hkv, d, dtype, nb, seed=6),
    ]
    for step in steps:
        _check_step(fi, ref, step, fc, rc)
    # Two metas prepared before either runs: the second plan displaces the first on the
    # decode wrapper, so forward must notice and re-plan rather than use a stale plan.
    a = _Step([(20, 1), (33, 1)], False, hq, hkv, d, dtype, nb, seed=7)
    b = _Step([(5, 1), (70, 1), (2, 1)], False, hq, hkv, d, dtype, nb, seed=8)
    ma, mb = a.meta("cuda"), b.meta("cuda")
    fi.prepare(ma)
    fi.prepare(mb)
    for step, m in ((a, ma), (b, mb)):
        ref_meta = step.meta("cpu")
        ref.prepare(ref_meta)
        kc, vc = fc[0]
        kr, vr = rc[0]
        out = fi.forward(step.q.to("cuda", dtype), step.k.to("cuda", dtype),
                         step.v.to("cuda", dtype), kc, vc, m)
        exp = ref.forward(step.q, step.k, step.v, kr, vr, ref_meta)
        torch.testing.assert_close(out.float().cpu(), exp, atol=TOL, rtol=TOL)


@needs_cuda
def test_eager_plan_with_known_dtype():
    hq, hkv, d, dtype = 8, 2, 64, torch.bfloat16
    fi, ref, fc, rc = _setup(hq, hkv, d, dtype, num_blocks=32)
    fi.dtype = dtype  # as if constructed with dtype=...: prepare() plans, forward() reuses
    _check_step(fi, ref, _Step([(3, 4), (0, 9)], True, hq, hkv, d, dtype, 32, seed=9), fc, rc)
    _check_step(fi, ref, _Step([(7, 1), (9, 1)], False, hq, hkv, d, dtype, 32, seed=10), fc, rc)
