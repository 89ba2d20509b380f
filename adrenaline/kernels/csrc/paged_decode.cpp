// Decode attention on the CPU, reading each sequence's KV pages in place (AVX-512).
//
// One query token per sequence. Pages are the torch backend's layout:
// [num_kv_heads, num_blocks, block_size, head_dim], float32 or bfloat16. Per
// (sequence, KV head), the query heads of its group are scored against the keys
// block by block, with no gathered copy of the keys or values.
//
// Invariants:
// - A sequence's output depends only on its own query, pages and length: each
//   (sequence, KV head) is one serial computation in a fixed order, so the output
//   is the same bit for bit whatever the batch beside it or the thread count.
// - Keys are reduced in chunks of CHUNK positions (0-127, 128-255, ...) with an
//   online softmax (running max and sum, rescaled per chunk). The chunks sit at
//   fixed positions, so the result does not depend on the block size either.
// - Accumulation is in float32; a bfloat16 output is rounded to nearest even.
// - Reading the keys, the key and value rows PF positions ahead are prefetched where
//   they lie on a page that does not follow the current one in memory. A served
//   sequence's pages lie apart in the pool, and the hardware prefetcher, which follows
//   addresses, would start every such page with cache misses. Prefetches change no
//   result.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <limits>

namespace {

constexpr int CHUNK = 128;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }

inline void store16(at::BFloat16* p, __m512 x) {
  __m512i u = _mm512_castps_si512(x);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

// e^x for x <= 0: 2^n e^r with |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes
// expf's coefficients, about 1 ulp); below -87.3 the result is e^-87.3, not 0, which
// a softmax over at least one 0-exponent term absorbs.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

constexpr int PF = 32;  // positions: 4 KiB of keys ahead at head_dim 64 in bfloat16

template <typename T, int D>
inline void prefetch_row(const T* p) {
  for (int off = 0; off < int(D * sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + off, _MM_HINT_T0);
}

struct Pages {
  int64_t num_blocks, block_size;
};

// One sequence, one KV head: its G query heads (NV vectors of 16 each) over `len` keys.
template <typename T, int NV, int G>
void attend(const T* q, const T* kc, const T* vc, T* out, const int32_t* table, int64_t len,
            Pages pages, int64_t kv_head, float scale) {
  constexpr int D = NV * 16;
  __m512 qv[G][NV], acc[G][NV];
  alignas(64) float s[G][CHUNK];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < NV; ++j) {
      qv[g][j] = _mm512_mul_ps(load16(q + g * D + 16 * j), _mm512_set1_ps(scale));
      acc[g][j] = _mm512_setzero_ps();
    }
    m[g] = NEG_INF;
    l[g] = 0.f;
  }
  const int64_t bs = pages.block_size, head = kv_head * pages.num_blocks;
  for (int64_t start = 0; start < len; start += CHUNK) {
    const int n = int(std::min<int64_t>(CHUNK, len - start));
    for (int t = 0; t < n; ++t) {  // scores
      const int64_t pos = start + t;
      const int64_t page = pos / bs, page_ahead = (pos + PF) / bs;
      const T* k = kc + ((head + table[page]) * bs + pos % bs) * D;
      // Only where that row's page does not follow this one in memory (where it does, the
      // hardware prefetcher is already there); the value row too: the loop below reads it.
      if (pos + PF < len && table[page_ahead] != table[page] + (page_ahead - page)) {
        const int64_t ahead = ((head + table[page_ahead]) * bs + (pos + PF) % bs) * D;
        prefetch_row<T, D>(kc + ahead);
        prefetch_row<T, D>(vc + ahead);
      }
      __m512 kv[NV];
      for (int j = 0; j < NV; ++j) kv[j] = load16(k + 16 * j);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int j = 1; j < NV; ++j) a = _mm512_fmadd_ps(qv[g][j], kv[j], a);
        s[g][t] = _mm512_reduce_add_ps(a);
      }
    }
    const int full = n / 16, tail = n % 16;
    const __mmask16 tmask = __mmask16((1u << tail) - 1);
    for (int g = 0; g < G; ++g) {  // online softmax: this chunk's max, exps, sum
      __m512 mx = _mm512_set1_ps(NEG_INF);
      for (int i = 0; i < full; ++i) mx = _mm512_max_ps(mx, _mm512_load_ps(s[g] + 16 * i));
      if (tail) mx = _mm512_mask_max_ps(mx, tmask, mx, _mm512_load_ps(s[g] + 16 * full));
      const float cm = _mm512_reduce_max_ps(mx);
      const float mn = cm > m[g] ? cm : m[g];
      const __m512 mnv = _mm512_set1_ps(mn);
      __m512 sum = _mm512_setzero_ps();
      for (int i = 0; i < full; ++i) {
        __m512 p = exp_nonpos(_mm512_sub_ps(_mm512_load_ps(s[g] + 16 * i), mnv));
        _mm512_store_ps(s[g] + 16 * i, p);
        sum = _mm512_add_ps(sum, p);
      }
      if (tail) {
        __m512 p = exp_nonpos(_mm512_sub_ps(_mm512_load_ps(s[g] + 16 * full), mnv));
        _mm512_store_ps(s[g] + 16 * full, p);
        sum = _mm512_mask_add_ps(sum, tmask, sum, p);
      }
      // Rescale what earlier chunks accumulated to the new max (nothing before chunk 0).
      __m512 alpha = m[g] == NEG_INF ? _mm512_setzero_ps() : exp_nonpos(_mm512_set1_ps(m[g] - mn));
      l[g] = l[g] * _mm512_cvtss_f32(alpha) + _mm512_reduce_add_ps(sum);
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_mul_ps(acc[g][j], alpha);
      m[g] = mn;
    }
    for (int t = 0; t < n; ++t) {  // probabilities x values
      const int64_t pos = start + t;
      const T* v = vc + ((head + table[pos / bs]) * bs + pos % bs) * D;
      __m512 vv[NV];
      for (int j = 0; j < NV; ++j) vv[j] = load16(v + 16 * j);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(s[g][t]);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / l[g]);
    for (int j = 0; j < NV; ++j) store16(out + g * D + 16 * j, _mm512_mul_ps(acc[g][j], inv));
  }
}

template <typename T>
using Attend = void (*)(const T*, const T*, const T*, T*, const int32_t*, int64_t, Pages,
                        int64_t, float);

template <typename T, int NV>
Attend<T> for_group(int64_t g) {
  switch (g) {
    case 1: return attend<T, NV, 1>;
    case 2: return attend<T, NV, 2>;
    case 3: return attend<T, NV, 3>;
    case 4: return attend<T, NV, 4>;
    case 5: return attend<T, NV, 5>;
    case 6: return attend<T, NV, 6>;
    case 7: return attend<T, NV, 7>;
    case 8: return attend<T, NV, 8>;
    default: return nullptr;
  }
}

template <typename T>
Attend<T> for_shape(int64_t head_dim, int64_t group) {
  if (head_dim == 64) return for_group<T, 4>(group);
  if (head_dim == 128) return for_group<T, 8>(group);
  return nullptr;
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
         const torch::Tensor& tables, const torch::Tensor& lens, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kc.size(0);
  const int64_t G = Hq / Hkv, W = tables.size(1);
  const Attend<T> fn = for_shape<T>(D, G);
  TORCH_CHECK(fn, "paged_decode: no kernel for head_dim ", D, " with ", G, " query heads per KV head");
  const Pages pages{kc.size(1), kc.size(2)};
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      fn(qp + (b * Hq + h * G) * D, kp, vp, op + (b * Hq + h * G) * D, tp + b * W, lp[b], pages,
         h, float(scale));
    }
  });
}

}  // namespace

// q [B, Hq, D]; k/v pages [Hkv, NB, bs, D] (same dtype, contiguous); tables [B, W] int32;
// lens [B] int64 (keys per sequence, each <= W * bs). Returns [B, Hq, D] in q's dtype.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kc.dim() == 4 && kc.sizes() == vc.sizes(), "paged_decode: shapes");
  TORCH_CHECK(q.scalar_type() == kc.scalar_type() && kc.scalar_type() == vc.scalar_type(),
              "paged_decode: q and pages must share a dtype");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "paged_decode: pages must be contiguous");
  TORCH_CHECK(q.size(2) == kc.size(3) && q.size(1) % kc.size(0) == 0, "paged_decode: heads");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lens.scalar_type() == at::kLong &&
              tables.size(0) == q.size(0) && lens.size(0) == q.size(0), "paged_decode: tables/lens");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < lens.size(0); ++b)  // a longer one would read past its table
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= tables.size(1) * kc.size(2), "paged_decode: sequence ", b,
                " has ", lp[b], " keys; its table holds 1 to ", tables.size(1) * kc.size(2));
  torch::Tensor out = torch::empty_like(q);
  if (q.scalar_type() == at::kFloat) run<float>(q, kc, vc, tables, lens, scale, out);
  else if (q.scalar_type() == at::kBFloat16) run<at::BFloat16>(q, kc, vc, tables, lens, scale, out);
  else TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  return out;
}

// Runs without the GIL: an executor serves several decode workers from threads of one
// process, and a worker's other threads (RPCs, the KV handoff) keep running meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over KV pages, read in place",
        py::call_guard<py::gil_scoped_release>());
}
