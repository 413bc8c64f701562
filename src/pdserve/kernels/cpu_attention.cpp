// Paged attention for decode on CPU: each sequence's single query token attends over its K/V blocks
// where they lie in the cache (no gather into a padded copy). A work item is a sequence (or, with few
// sequences, one of its KV heads): all the query heads that share a KV head are scored together, so each K
// and V row is read from memory once and converted to float32 once. Softmax is exact (scores for the whole
// context are kept, then normalized), accumulation is in float32. A float8_e4m3fn cache (no scale) is
// read the same way, each K and V row widened to float32 (dispatch.h).
//
// Registered as torch.ops.pdserve.paged_decode_attention; built on first use by pdserve.kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline void to_float_row(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
inline void to_float_row(const pdserve::Fp8* __restrict src, float* __restrict dst, int64_t n) {
  pdserve::fp8_to_float_row(src, dst, n);
}

#if defined(__AVX512BF16__)
// a . b for bfloat16 rows of HEAD_DIM (a multiple of 32) elements: products exact, sums in float32, by
// the CPU's bfloat16 dot-product instruction (no conversion of the K row).
template <int64_t HEAD_DIM>
inline float dot_bf16(const c10::BFloat16* a, const c10::BFloat16* b) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < HEAD_DIM; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
  return _mm512_reduce_add_ps(acc);
}
template <typename Q, typename C, int64_t HEAD_DIM>
constexpr bool kDotBf16 = std::is_same_v<Q, c10::BFloat16> && std::is_same_v<C, c10::BFloat16> &&
                          HEAD_DIM > 0 && HEAD_DIM % 32 == 0;

// The 16 sums of 16 vectors: lane i of the result is the sum of the lanes of v[i] (a tree of in-lane and
// cross-lane shuffles: 45 instructions for 16 sums, against about 10 for each one reduced alone).
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [v0+v2, w0+w2, v1+v3, w1+w3] of v = v[2k], w = v[2k + 1]
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: that lane's sums of v[4k .. 4k + 3]
    b[k] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0x44), _mm512_shuffle_ps(a[2 * k], a[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; ++k)  // 128-bit lanes: [b.L0 + b.L1, b.L2 + b.L3, b'.L0 + b'.L1, b'.L2 + b'.L3]
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88), _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Scores of one query head against 16 K rows (null rows: not read, score 0), by 16 dot products at once.
template <int64_t HEAD_DIM>
inline __m512 scores16_bf16(const c10::BFloat16* q, const c10::BFloat16* const* rows) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) {
    acc[i] = _mm512_setzero_ps();
    if (rows[i] == nullptr) continue;
    for (int64_t d = 0; d < HEAD_DIM; d += 32)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(rows[i] + d));
  }
  return sum16(acc);
}
#else
template <typename Q, typename C, int64_t HEAD_DIM>
constexpr bool kDotBf16 = false;
template <int64_t HEAD_DIM>
inline float dot_bf16(const c10::BFloat16*, const c10::BFloat16*) { return 0.f; }
#endif

// Asks for the rows an item will read from a block a little ahead of time (the blocks of a context lie
// anywhere in memory, beyond what the hardware prefetcher guesses): `rows` rows of `bytes` each, `stride`
// elements apart.
template <typename C>
inline void prefetch_rows(const C* p, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t i = 0; i < rows; ++i) {
    const char* row = reinterpret_cast<const char*>(p + i * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
}
constexpr int64_t kPrefetchBlocks = 4;  // how far ahead, in blocks

// HEAD_DIM > 0 fixes head_dim at compile time (unrolled, vectorized inner loops); 0 reads it at run time.
template <typename Q, typename C, int64_t HEAD_DIM>
void decode_attention(Q* __restrict out, const Q* __restrict q, const C* __restrict k_cache,
                      const C* __restrict v_cache, const int64_t* __restrict tables,
                      const int64_t* __restrict lens, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t runtime_head_dim, int64_t block_size, int64_t max_blocks,
                      float scale, int64_t window) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;     // elements between two tokens of a block
  const int64_t block_stride = block_size * token_stride;   // elements between two blocks
  // A work item is a run of KV heads of one sequence: all of them (each token's K and V rows are read
  // as one contiguous run) when there are enough sequences to keep every thread busy, else one.
  const int64_t heads_per_item = num_seqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t items_per_seq = num_kv_heads / heads_per_item;
  at::parallel_for(0, num_seqs * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_q = heads_per_item * group;  // query heads of one item
    std::vector<float> qf(max_q * head_dim), acc(max_q * head_dim), row(heads_per_item * head_dim),
        inv_sum(max_q);
    std::vector<float> scores;  // (query heads of the item, context_len)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / items_per_seq, kv0 = (item % items_per_seq) * heads_per_item;
      // Attend to positions [first, end): the whole context, or its last `window` tokens. Scores are
      // indexed from `first`; the loops below walk whole blocks and skip the positions before it.
      const int64_t end_pos = lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, end_pos - window) : 0;
      const int64_t len = end_pos - first;
      const int64_t* table = tables + seq * max_blocks;
      const int64_t head0 = seq * num_heads + kv0 * group;  // first query head of the item
      const int64_t row_len = heads_per_item * head_dim;
      for (int64_t h = 0; h < max_q; ++h) {
        to_float_row(q + (head0 + h) * head_dim, qf.data() + h * head_dim, head_dim);
        for (int64_t d = 0; d < head_dim; ++d) qf[h * head_dim + d] *= scale;
      }
      scores.resize(max_q * len);
      float* __restrict s = scores.data();
      // Scores: q . k for every context token, block by block. Token p0 + i of a block has score index
      // p0 + i - first; t0 below is that index of the block's first token (negative in the first block of a
      // window that starts inside it, whose earlier tokens are skipped).
      const int64_t row_bytes = row_len * static_cast<int64_t>(sizeof(C));
      for (int64_t p0 = first - first % block_size; p0 < end_pos; p0 += block_size) {
        const C* kb = k_cache + table[p0 / block_size] * block_stride + kv0 * head_dim;
        const int64_t i0 = std::max<int64_t>(0, first - p0), n = std::min(block_size, end_pos - p0);
        const int64_t t0 = p0 - first;
        const int64_t ahead = p0 + kPrefetchBlocks * block_size;
        if (ahead < end_pos) {
          const int64_t off = table[ahead / block_size] * block_stride + kv0 * head_dim;
          prefetch_rows(k_cache + off, std::min(block_size, end_pos - ahead), token_stride, row_bytes);
          prefetch_rows(v_cache + off, std::min(block_size, end_pos - ahead), token_stride, row_bytes);
        }
        if constexpr (kDotBf16<Q, C, HEAD_DIM>) {
#if defined(__AVX512BF16__)
          if (block_size == 16) {  // the block's 16 rows scored at once, per query head
            const __mmask16 keep = static_cast<__mmask16>(((1u << n) - 1) & ~((1u << i0) - 1));
            const c10::BFloat16* rows[16];
            for (int64_t kvh = 0; kvh < heads_per_item; ++kvh) {
              for (int64_t i = 0; i < 16; ++i) rows[i] = i < n ? kb + i * token_stride + kvh * head_dim : nullptr;
              for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
                _mm512_mask_storeu_ps(s + h * len + t0, keep,
                                      _mm512_mul_ps(_mm512_set1_ps(scale),
                                                    scores16_bf16<HEAD_DIM>(q + (head0 + h) * head_dim, rows)));
            }
            continue;
          }
#endif
          for (int64_t i = i0; i < n; ++i) {
            const C* krow = kb + i * token_stride;
            for (int64_t h = 0; h < max_q; ++h)
              s[h * len + t0 + i] = scale * dot_bf16<HEAD_DIM>(q + (head0 + h) * head_dim, krow + (h / group) * head_dim);
          }
          continue;
        }
        for (int64_t i = i0; i < n; ++i) {
          to_float_row(kb + i * token_stride, row.data(), row_len);
          for (int64_t h = 0; h < max_q; ++h) {
            const float* __restrict qh = qf.data() + h * head_dim;
            const float* __restrict kh = row.data() + (h / group) * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];
            s[h * len + t0 + i] = dot;
          }
        }
      }
      // Softmax over the context, per query head (normalized at the end).
      for (int64_t h = 0; h < max_q; ++h) {
        float* __restrict sh = s + h * len;
        float mx = sh[0];
        for (int64_t t = 1; t < len; ++t) mx = std::max(mx, sh[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - mx);
          sum += sh[t];
        }
        inv_sum[h] = 1.f / sum;
      }
      // Values: probability-weighted sum of V rows.
      if constexpr (kDotBf16<Q, C, HEAD_DIM>) {
#if defined(__AVX512BF16__)
        // Up to 4 query heads of a KV head at a time, their sums held in registers over the whole
        // context; each V row is widened to float32 once for all of them.
        constexpr int64_t kChunks = HEAD_DIM / 16, kHeads = kChunks <= 4 ? 4 : 2;
        for (int64_t kvh = 0; kvh < heads_per_item; ++kvh)
          for (int64_t h0 = kvh * group; h0 < (kvh + 1) * group; h0 += kHeads) {
            const int64_t nh = std::min(kHeads, (kvh + 1) * group - h0);
            __m512 sum[kHeads][kChunks];
            for (int64_t hh = 0; hh < kHeads; ++hh)
              for (int64_t c = 0; c < kChunks; ++c) sum[hh][c] = _mm512_setzero_ps();
            for (int64_t p0 = first - first % block_size; p0 < end_pos; p0 += block_size) {
              const C* vb = v_cache + table[p0 / block_size] * block_stride + (kv0 + kvh) * head_dim;
              const int64_t i0 = std::max<int64_t>(0, first - p0), n = std::min(block_size, end_pos - p0);
              const float* sp = s + h0 * len + (p0 - first);
              for (int64_t i = i0; i < n; ++i) {
                const C* vrow = vb + i * token_stride;
                for (int64_t c = 0; c < kChunks; ++c) {
                  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + 16 * c))), 16));
                  for (int64_t hh = 0; hh < kHeads; ++hh)
                    if (hh < nh) sum[hh][c] = _mm512_fmadd_ps(_mm512_set1_ps(sp[hh * len + i]), v, sum[hh][c]);
                }
              }
            }
            for (int64_t hh = 0; hh < nh; ++hh) {
              Q* o = out + (head0 + h0 + hh) * head_dim;
              for (int64_t c = 0; c < kChunks; ++c) {
                alignas(64) float tmp[16];
                _mm512_store_ps(tmp, _mm512_mul_ps(sum[hh][c], _mm512_set1_ps(inv_sum[h0 + hh])));
                for (int64_t d = 0; d < 16; ++d) o[16 * c + d] = static_cast<Q>(tmp[d]);
              }
            }
          }
        continue;
#endif
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p0 = first - first % block_size; p0 < end_pos; p0 += block_size) {
        const C* vb = v_cache + table[p0 / block_size] * block_stride + kv0 * head_dim;
        const int64_t i0 = std::max<int64_t>(0, first - p0), n = std::min(block_size, end_pos - p0);
        const int64_t t0 = p0 - first;
        for (int64_t i = i0; i < n; ++i) {
          to_float_row(vb + i * token_stride, row.data(), row_len);
          for (int64_t h = 0; h < max_q; ++h) {
            const float p = s[h * len + t0 + i];
            const float* __restrict vh = row.data() + (h / group) * head_dim;
            float* __restrict ah = acc.data() + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * vh[d];
          }
        }
      }
      for (int64_t h = 0; h < max_q; ++h) {
        Q* o = out + (head0 + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<Q>(acc[h * head_dim + d] * inv_sum[h]);
      }
    }
  });
}

template <typename Q, typename C>
void run_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                const at::Tensor& lens, double scale, int64_t window) {
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2);
  const int64_t half = num_blocks * block_size * kv_cache.size(3) * kv_cache.size(4);
  const C* cache = kv_cache.data_ptr<C>();
  auto kernel = q.size(2) == 64 ? decode_attention<Q, C, 64>
              : q.size(2) == 128 ? decode_attention<Q, C, 128> : decode_attention<Q, C, 0>;
  kernel(out.data_ptr<Q>(), q.data_ptr<Q>(), cache, cache + half, tables.data_ptr<int64_t>(),
         lens.data_ptr<int64_t>(), q.size(0), q.size(1), kv_cache.size(3), q.size(2), block_size, tables.size(1),
         static_cast<float>(scale), window);
}

// out, q: (num_seqs, num_heads, head_dim); kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim);
// block_tables: (num_seqs, max_blocks) int64; context_lens: (num_seqs,) int64, each >= 1; window: attend to
// the last `window` positions only (0: all).
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "bad shapes");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && kv_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "out must match q");
  TORCH_CHECK(q.size(1) % kv_cache.size(3) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.size(2) == kv_cache.size(4), "head_dim of q and cache differ");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no window)");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              block_tables.is_contiguous() && context_lens.is_contiguous() &&
              block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "block_tables (num_seqs, max_blocks) and context_lens (num_seqs,) must be contiguous int64");
  PDSERVE_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    using Q = scalar_t;
    PDSERVE_DISPATCH_KV_TYPES(kv_cache.scalar_type(), "paged_decode_attention (KV cache)", [&] {
      run_decode<Q, scalar_t>(out, q, kv_cache, block_tables, context_lens, scale, window);
    });
  });
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window=0) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
