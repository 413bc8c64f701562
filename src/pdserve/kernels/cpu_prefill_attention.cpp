// Paged attention for prefill chunks on CPU, in the flash-attention manner: the chunk's queries attend
// (causally, and within a sliding window when one is given) to keys and values read where they lie in the
// paged cache (the chunk's own K/V already written there, a cached prefix or earlier chunks before them),
// one tile of 16 positions at a time, with an online softmax; nothing is gathered into a padded copy and no
// mask tensor is built. A work item is one tile of 16 query tokens of one chunk under one KV head: every
// query head sharing that KV head is computed with it, so each K/V tile is read once per item.
//
// Vector path (AVX-512, head_dim 64 or 128, queries and cache both float32 or both bfloat16): query rows
// lie across vector lanes, 16 rows per vector, so a K or V element is broadcast to all of them and the
// softmax over positions is element-wise (no horizontal reductions). bfloat16 runs scores and the
// probability-weighted sum of V on the CPU's bfloat16 dot-product instruction (queries packed in pairs of
// dimensions, V in pairs of positions, probabilities rounded to bfloat16 as flash attention does on GPUs),
// accumulating in float32. A float8_e4m3fn cache (no scale) takes the vector path too, each tile's K and V
// rows widened to the queries' dtype as they are loaded (exact: every e4m3 value is a bfloat16 value).
// Everything else takes the portable path: float32 arithmetic row by row.
//
// Registered as torch.ops.pdserve.paged_prefill_attention; built on first use by pdserve.kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kKeys = 16;     // positions per key tile
constexpr int64_t kQueries = 16;  // query tokens per work item
constexpr int64_t kLanes = 16;    // float32 lanes of a 512-bit vector
constexpr float kNoMax = -1e30f;  // running max before any score (finite: built with -ffast-math)

inline float f32(float x) { return x; }
inline float f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float f32(c10::Half x) { return static_cast<float>(x); }
inline float f32(pdserve::Fp8 x) { return pdserve::fp8_to_float(x); }

// Where things are: the arguments every work item reads.
template <typename T, typename C>
struct Problem {
  T* out;
  const T* q;
  const C *k_cache, *v_cache;
  const int64_t *tables, *query_starts, *context_starts;
  int64_t num_chunks, num_heads, num_kv_heads, head_dim, block_size, max_blocks, window;
  float scale;

  int64_t group() const { return num_heads / num_kv_heads; }
  // Offset of position `pos`'s K (and V) row for KV head g in chunk c's blocks.
  int64_t kv_offset(int64_t c, int64_t g, int64_t pos) const {
    const int64_t token_stride = num_kv_heads * head_dim;
    return tables[c * max_blocks + pos / block_size] * block_size * token_stride + (pos % block_size) * token_stride +
           g * head_dim;
  }
};

// One work item's queries: rows r = 0 .. rows - 1 are token r / group (position pos0 + r / group) under
// query head g * group + r % group; row r of q and out is at row_offset(r).
struct Item {
  int64_t chunk, kv_head, tok0, ntok, pos0, cost;
};

template <typename T, typename C>
std::vector<Item> work_items(const Problem<T, C>& pb) {
  std::vector<Item> items;
  for (int64_t c = 0; c < pb.num_chunks; ++c) {
    const int64_t n = pb.query_starts[c + 1] - pb.query_starts[c];
    for (int64_t t = 0; t < n; t += kQueries) {
      const int64_t ntok = std::min(kQueries, n - t), pos0 = pb.context_starts[c] + t;
      const int64_t seen = pb.window > 0 ? std::min(pos0 + ntok, pb.window + kQueries) : pos0 + ntok;
      for (int64_t g = 0; g < pb.num_kv_heads; ++g) items.push_back({c, g, pb.query_starts[c] + t, ntok, pos0, seen});
    }
  }
  // The most expensive first (causal: later tiles see more keys); threads take them in turn.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Runs fn(scratch, item) over all items on torch's threads, each thread taking the next item when done.
template <typename Scratch, typename Fn>
void for_each_item(const std::vector<Item>& items, Fn fn) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch w;
    for (int64_t i = next++; i < n; i = next++) fn(w, items[i]);
  });
}

// Positions [lo, hi] that a query at `pos` sees.
inline int64_t window_start(int64_t pos, int64_t window) { return window > 0 ? pos - window + 1 : 0; }

// ---- portable path ------------------------------------------------------------------------------------------

struct PortableScratch {
  std::vector<float> q, kt, v, o, mx, sum;
};

template <typename T, typename C>
void item_portable(const Problem<T, C>& pb, PortableScratch& w, const Item& it) {
  const int64_t D = pb.head_dim, group = pb.group(), rows = it.ntok * group;
  auto row_offset = [&](int64_t r) { return ((it.tok0 + r / group) * pb.num_heads + it.kv_head * group + r % group) * D; };
  w.q.resize(rows * D);
  w.kt.resize(D * kKeys);
  w.v.resize(kKeys * D);
  w.o.assign(rows * D, 0.f);
  w.mx.assign(rows, kNoMax);
  w.sum.assign(rows, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = f32(pb.q[row_offset(r) + d]) * pb.scale;
  const int64_t last = it.pos0 + it.ntok - 1;
  const int64_t first = std::max<int64_t>(0, window_start(it.pos0, pb.window));
  for (int64_t k0 = first - first % kKeys; k0 <= last; k0 += kKeys) {
    const int64_t nk = std::min(kKeys, last + 1 - k0);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t off = pb.kv_offset(it.chunk, it.kv_head, k0 + j);
      for (int64_t d = 0; d < D; ++d) {
        w.kt[d * kKeys + j] = f32(pb.k_cache[off + d]);
        w.v[j * D + d] = f32(pb.v_cache[off + d]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = it.pos0 + r / group;
      const int64_t j_lo = std::max<int64_t>(0, window_start(pos, pb.window) - k0), j_hi = std::min(nk - 1, pos - k0);
      if (j_lo > j_hi) continue;
      float s[kKeys] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float qd = w.q[r * D + d];
#pragma omp simd
        for (int64_t j = 0; j < kKeys; ++j) s[j] += qd * w.kt[d * kKeys + j];
      }
      float new_max = w.mx[r];
      for (int64_t j = j_lo; j <= j_hi; ++j) new_max = std::max(new_max, s[j]);
      const float alpha = std::exp(w.mx[r] - new_max);  // 0 on the first tile: kNoMax - finite
      w.mx[r] = new_max;
      float* __restrict o = w.o.data() + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
      float tile_sum = 0.f;
      for (int64_t j = j_lo; j <= j_hi; ++j) {
        const float p = std::exp(s[j] - new_max);
        tile_sum += p;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * w.v[j * D + d];
      }
      w.sum[r] = w.sum[r] * alpha + tile_sum;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) pb.out[row_offset(r) + d] = static_cast<T>(w.o[r * D + d] / w.sum[r]);
}

// ---- vector path (AVX-512) ----------------------------------------------------------------------------------

#if defined(__AVX512F__)
template <typename T, typename C, int64_t D>
constexpr bool kVector = D > 0 && D % 16 == 0 && (std::is_same_v<T, C> || std::is_same_v<C, pdserve::Fp8>) &&
                         (std::is_same_v<T, float>
#if defined(__AVX512BF16__)
                          || std::is_same_v<T, c10::BFloat16>
#endif
                         );

// exp(x) for x <= 0 (scores minus their running max): x = (n + f) ln 2 with n an integer and |f| <= 1/2,
// exp(f ln 2) by its Taylor series to degree 6 (relative error < 2e-7), scaled by 2^n.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 u = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bcast(const float* x) { return _mm512_set1_ps(*x); }

// One cache row of n elements (a multiple of 16) into the tile, in the queries' dtype T.
template <typename T>
inline void load_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, n * sizeof(T)); }
inline void load_row(float* dst, const pdserve::Fp8* src, int64_t n) { pdserve::fp8_to_float_row(src, dst, n); }
inline void load_row(c10::BFloat16* dst, const pdserve::Fp8* src, int64_t n) {
  alignas(64) float tmp[16];
  for (int64_t i = 0; i < n; i += 16) {  // float32 -> bfloat16 by truncation: exact for e4m3 values
    pdserve::fp8_to_float_row(src + i, tmp, 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_load_si512(tmp), 16)));
  }
}
inline __m512i bcast32(const void* x) { return _mm512_set1_epi32(*static_cast<const int32_t*>(x)); }

// Scratch for one item: q holds the queries transposed, (head_dim, lanes) floats or (head_dim / 2, lanes)
// bfloat16 pairs; o the output transposed, (vectors, head_dim, 16); k and v the tile's rows as in the cache
// (zeros past the chunk's last position); vpairs V as (kKeys / 2, head_dim) pairs of positions.
struct VectorScratch {
  std::vector<float> qt, o, mx, sum;
  std::vector<int32_t> pos, lo;
  std::vector<uint32_t> qpairs, vpairs;
  std::vector<uint8_t> k, v;
};

template <typename T, typename C, int64_t D>
void item_vector(const Problem<T, C>& pb, VectorScratch& w, const Item& it) {
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t group = pb.group(), rows = it.ntok * group;
  const int64_t nvec = (rows + kLanes - 1) / kLanes, lanes = nvec * kLanes;
  auto row_offset = [&](int64_t r) { return ((it.tok0 + r / group) * pb.num_heads + it.kv_head * group + r % group) * D; };
  // Queries across lanes (padding lanes zero), each lane's visible positions (padding lanes: none).
  w.pos.resize(lanes);
  w.lo.resize(lanes);
  for (int64_t r = 0; r < lanes; ++r) {
    w.pos[r] = r < rows ? static_cast<int32_t>(it.pos0 + r / group) : -1;
    w.lo[r] = r < rows ? static_cast<int32_t>(window_start(w.pos[r], pb.window)) : 0;
  }
  if constexpr (bf16) {
    w.qpairs.assign(D / 2 * lanes, 0u);
    for (int64_t r = 0; r < rows; ++r) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(pb.q + row_offset(r));
      for (int64_t p = 0; p < D / 2; ++p) w.qpairs[p * lanes + r] = src[p];
    }
  } else {
    w.qt.assign(D * lanes, 0.f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) w.qt[d * lanes + r] = pb.q[row_offset(r) + d];
  }
  w.o.assign(nvec * D * kLanes, 0.f);
  w.mx.assign(lanes, kNoMax);
  w.sum.assign(lanes, 0.f);
  w.k.resize(kKeys * D * sizeof(T));
  w.v.resize(kKeys * D * sizeof(T));
  w.vpairs.resize(kKeys / 2 * D);
  const T* kt = reinterpret_cast<const T*>(w.k.data());
  T* kbuf = reinterpret_cast<T*>(w.k.data());
  T* vbuf = reinterpret_cast<T*>(w.v.data());

  const __m512 vscale = _mm512_set1_ps(pb.scale);
  const int64_t last = it.pos0 + it.ntok - 1;
  const int64_t first = std::max<int64_t>(0, window_start(it.pos0, pb.window));
  for (int64_t k0 = first - first % kKeys; k0 <= last; k0 += kKeys) {
    const int64_t nk = std::min(kKeys, last + 1 - k0);
    for (int64_t j = 0; j < kKeys; ++j) {
      if (j < nk) {
        const int64_t off = pb.kv_offset(it.chunk, it.kv_head, k0 + j);
        load_row(kbuf + j * D, pb.k_cache + off, D);
        load_row(vbuf + j * D, pb.v_cache + off, D);
      } else {
        std::memset(kbuf + j * D, 0, D * sizeof(T));
        std::memset(vbuf + j * D, 0, D * sizeof(T));
      }
    }
    if constexpr (bf16) {  // V in pairs of positions: word (jp, d) = (v[2jp][d], v[2jp + 1][d])
      for (int64_t jp = 0; jp < kKeys / 2; ++jp)
        for (int64_t d = 0; d < D; d += 16) {
          const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vbuf + 2 * jp * D + d)));
          const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vbuf + (2 * jp + 1) * D + d)));
          _mm512_storeu_si512(w.vpairs.data() + jp * D + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
    for (int64_t vi = 0; vi < nvec; ++vi) {
      const int64_t lane0 = vi * kLanes;
      // Scores s[j] (16 rows each) against the tile's positions.
      __m512 s[kKeys];
      for (int64_t j = 0; j < kKeys; ++j) s[j] = _mm512_setzero_ps();
      if constexpr (bf16) {
#if defined(__AVX512BF16__)
        for (int64_t p = 0; p < D / 2; ++p) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(w.qpairs.data() + p * lanes + lane0);
          for (int64_t j = 0; j < kKeys; ++j) s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)bcast32(kt + j * D + 2 * p));
        }
#endif
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const __m512 qv = _mm512_loadu_ps(w.qt.data() + d * lanes + lane0);
          for (int64_t j = 0; j < kKeys; ++j) s[j] = _mm512_fmadd_ps(qv, bcast(reinterpret_cast<const float*>(kt) + j * D + d), s[j]);
        }
      }
      // Online softmax, element-wise over the 16 rows; positions a row does not see get probability 0.
      const __m512i pos = _mm512_loadu_si512(w.pos.data() + lane0), lo = _mm512_loadu_si512(w.lo.data() + lane0);
      __mmask16 seen[kKeys];
      __m512 tile_max = _mm512_set1_ps(kNoMax);
      for (int64_t j = 0; j < kKeys; ++j) {
        const __m512i kp = _mm512_set1_epi32(static_cast<int32_t>(k0 + j));
        seen[j] = _mm512_cmp_epi32_mask(kp, pos, _MM_CMPINT_LE) & _mm512_cmp_epi32_mask(kp, lo, _MM_CMPINT_NLT);
        s[j] = _mm512_mask_mul_ps(_mm512_set1_ps(kNoMax), seen[j], s[j], vscale);
        tile_max = _mm512_max_ps(tile_max, s[j]);
      }
      const __m512 old_max = _mm512_loadu_ps(w.mx.data() + lane0);
      const __m512 new_max = _mm512_max_ps(old_max, tile_max);
      const __m512 alpha = exp512(_mm512_sub_ps(old_max, new_max));  // 0 on a row's first seen tile
      __m512 tile_sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < kKeys; ++j) {
        s[j] = _mm512_maskz_mov_ps(seen[j], exp512(_mm512_sub_ps(s[j], new_max)));
        tile_sum = _mm512_add_ps(tile_sum, s[j]);
      }
      _mm512_storeu_ps(w.mx.data() + lane0, new_max);
      _mm512_storeu_ps(w.sum.data() + lane0, _mm512_fmadd_ps(_mm512_loadu_ps(w.sum.data() + lane0), alpha, tile_sum));
      // o = alpha * o + sum_j p[j] * v[j], 16 dimensions of the output at a time.
      float* o = w.o.data() + vi * D * kLanes;
      if constexpr (bf16) {
#if defined(__AVX512BF16__)
        __m512i pp[kKeys / 2];  // lane r: (p[2jp][r], p[2jp + 1][r]) as bfloat16
        for (int64_t jp = 0; jp < kKeys / 2; ++jp)
          pp[jp] = _mm512_or_si512(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * jp])),
                                   _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * jp + 1])), 16));
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __m512 acc[16];
          for (int64_t dd = 0; dd < 16; ++dd) acc[dd] = _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + dd) * kLanes), alpha);
          for (int64_t jp = 0; jp < (nk + 1) / 2; ++jp)
            for (int64_t dd = 0; dd < 16; ++dd)
              acc[dd] = _mm512_dpbf16_ps(acc[dd], (__m512bh)pp[jp], (__m512bh)bcast32(w.vpairs.data() + jp * D + d0 + dd));
          for (int64_t dd = 0; dd < 16; ++dd) _mm512_storeu_ps(o + (d0 + dd) * kLanes, acc[dd]);
        }
#endif
      } else {
        const float* vf = reinterpret_cast<const float*>(vbuf);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __m512 acc[16];
          for (int64_t dd = 0; dd < 16; ++dd) acc[dd] = _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + dd) * kLanes), alpha);
          for (int64_t j = 0; j < nk; ++j)
            for (int64_t dd = 0; dd < 16; ++dd) acc[dd] = _mm512_fmadd_ps(s[j], bcast(vf + j * D + d0 + dd), acc[dd]);
          for (int64_t dd = 0; dd < 16; ++dd) _mm512_storeu_ps(o + (d0 + dd) * kLanes, acc[dd]);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / w.sum[r];
    const float* o = w.o.data() + (r / kLanes) * D * kLanes + r % kLanes;
    T* dst = pb.out + row_offset(r);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d * kLanes] * inv);
  }
}
#else
template <typename T, typename C, int64_t D>
constexpr bool kVector = false;
#endif

template <typename T, typename C, int64_t D>
void run(const Problem<T, C>& pb) {
  const std::vector<Item> items = work_items(pb);
#if defined(__AVX512F__)
  if constexpr (kVector<T, C, D>) {
    for_each_item<VectorScratch>(items, [&](VectorScratch& w, const Item& it) { item_vector<T, C, D>(pb, w, it); });
    return;
  }
#endif
  for_each_item<PortableScratch>(items, [&](PortableScratch& w, const Item& it) { item_portable(pb, w, it); });
}

template <typename T, typename C>
void dispatch_head_dim(const Problem<T, C>& pb) {
  switch (pb.head_dim) {
    case 64: run<T, C, 64>(pb); break;
    case 128: run<T, C, 128>(pb); break;
    default: run<T, C, 0>(pb);
  }
}

template <typename T, typename C>
void run_prefill(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                 const at::Tensor& query_starts, const at::Tensor& context_starts, double scale, int64_t window) {
  const int64_t half = kv_cache.size(1) * kv_cache.size(2) * kv_cache.size(3) * kv_cache.size(4);
  const C* cache = kv_cache.data_ptr<C>();
  Problem<T, C> pb{out.data_ptr<T>(), q.data_ptr<T>(), cache, cache + half, tables.data_ptr<int64_t>(),
                   query_starts.data_ptr<int64_t>(), context_starts.data_ptr<int64_t>(), context_starts.size(0),
                   q.size(1), kv_cache.size(3), q.size(2), kv_cache.size(2), tables.size(1), window,
                   static_cast<float>(scale)};
  dispatch_head_dim(pb);
}

// out, q: (num_tokens, num_heads, head_dim), the rows of all chunks back to back; chunk c is rows
// [query_starts[c], query_starts[c + 1]) at positions context_starts[c] onwards, and its K/V (context and
// chunk) are in kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim) at block_tables[c]
// (num_chunks, max_blocks). window: attend to the last `window` positions only (0: all).
void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache,
                             const at::Tensor& block_tables, const at::Tensor& query_starts,
                             const at::Tensor& context_starts, double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_prefill_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "bad shapes");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && kv_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "out must match q");
  TORCH_CHECK(q.size(1) % kv_cache.size(3) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(2) % 2 == 0, "head_dim of q and cache differ, or is odd");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no window)");
  const int64_t num_chunks = context_starts.size(0);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && query_starts.scalar_type() == at::kLong &&
              context_starts.scalar_type() == at::kLong && block_tables.is_contiguous() &&
              query_starts.is_contiguous() && context_starts.is_contiguous() && block_tables.dim() == 2 &&
              block_tables.size(0) == num_chunks && query_starts.size(0) == num_chunks + 1,
              "block_tables (num_chunks, max_blocks), query_starts (num_chunks + 1,) and context_starts "
              "(num_chunks,) must be contiguous int64");
  TORCH_CHECK(query_starts.data_ptr<int64_t>()[num_chunks] == q.size(0), "query_starts must end at q's rows");
  PDSERVE_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_prefill_attention", [&] {
    using T = scalar_t;
    PDSERVE_DISPATCH_KV_TYPES(kv_cache.scalar_type(), "paged_prefill_attention (KV cache)", [&] {
      run_prefill<T, scalar_t>(out, q, kv_cache, block_tables, query_starts, context_starts, scale, window);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, "
        "Tensor query_starts, Tensor context_starts, float scale, int window=0) -> ()");
  m.impl("paged_prefill_attention", c10::DispatchKey::CPU, &paged_prefill_attention);
}
