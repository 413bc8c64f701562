// Matrix products with block-quantized weights that stay quantized in memory (GGUF's Q8_0, Q4_0, Q4_1,
// Q4_K, and int8 weights made at load): y (M, N) = x (M, K) @ W^T, W dequantized in registers.
//
// Weight layout (made once at load by pdserve.model.quant_weight.pack): tiles of 16 output rows x 32
// inputs, one record of TB bytes each, ordered (row tile, input block): [values | 16 scales | 16 mins],
// so that W[n, k] = scale[n, k / 32] * value[n, k] + min[n, k / 32], with unsigned values (4-bit: 0..15,
// 8-bit: 0..255, GGUF's signed int8 stored + 128 with min = -128 * scale). Values are interleaved for
// VNNI's dot product: 32-bit lane l of a 64-byte vector holds 4 consecutive inputs of output row l.
//   4-bit: 4 vectors; vector j's low nibbles hold inputs 4j..4j+3, its high nibbles 16+4j..16+4j+3.
//   8-bit: 8 vectors; vector g holds inputs 4g..4g+3.
// Scales and mins are float16 where that is exact (Q8_0, Q4_0, Q4_1), else float32 (Q4_K's 6-bit
// sub-block scales times its float16 super-block scale need up to 17 bits of mantissa).
//
// Activations are quantized per row and per 32-input block, to 15 bits by default (scale = max|x| /
// 16383, round to nearest even: an error 128 times smaller than int8's, below bfloat16's own rounding) or
// to int8 as llama.cpp does for these weight types (act_bits = 8: half the integer work). A block's
// contribution to y[m, n] is then scale_w * scale_x * sum(value * x_int) + min_w * scale_x * sum(x_int):
// integer dot products on AVX512 VNNI's vpdpbusd (unsigned weight bytes times signed activation bytes, 64
// products an instruction; a 15-bit activation is split into its signed high byte and 7-bit low byte,
// hi * 128 + lo, two instructions), float32 accumulation across blocks. The portable path computes the
// same in plain C++.
//
// Registered as torch.ops.pdserve.{quant_linear, quant_embedding, quant_isa}.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PDSERVE_QUANT_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileRows = 16;   // output rows per tile (one 512-bit vector of float32 results)
constexpr int64_t kBlock = 32;      // inputs per quantization block
constexpr int64_t kGroupTiles = 2;  // row tiles computed together (the packer pads N to 32)
constexpr int64_t kRowBlock = 64;   // activation rows kept hot in cache while a thread's tiles stream by

struct Layout {
  int64_t bits, scale_bytes, n, k, num_tiles, num_blocks;
  int64_t value_bytes() const { return bits == 4 ? 256 : 512; }
  int64_t tile_bytes() const { return value_bytes() + 2 * kTileRows * scale_bytes; }
};

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Scale and min of lane l of a tile record.
inline float tile_scale(const uint8_t* tile, const Layout& L, int64_t l, bool min) {
  const uint8_t* p = tile + L.value_bytes() + (min ? kTileRows * L.scale_bytes : 0) + l * L.scale_bytes;
  if (L.scale_bytes == 2) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_to_float(h);
  }
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

// Value of lane l, input i (0..31) of a tile record.
inline int tile_value(const uint8_t* tile, const Layout& L, int64_t l, int64_t i) {
  if (L.bits == 8) return tile[(i / 4) * 64 + l * 4 + i % 4];
  const int64_t half = i / 16, j = (i % 16) / 4, b = i % 4;
  const uint8_t byte = tile[j * 64 + l * 4 + b];
  return half == 0 ? (byte & 0x0F) : (byte >> 4);
}

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

// Rows of x quantized per 32-input block: per row, per block, the int8 values (act_bits 8) or the high
// bytes then the 7-bit low bytes (act_bits 16: 64 bytes a block), and the block's scale and scale *
// sum(values) (for the mins).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
  int64_t stride = 0, num_blocks = 0, block_bytes = 0;
  const int8_t* block(int64_t m, int64_t b) const { return q.data() + m * stride + b * block_bytes; }
};

template <typename T>
void quantize_row(const T* __restrict x, int64_t k, int64_t num_blocks, int64_t act_bits, int8_t* __restrict q,
                  float* __restrict scale, float* __restrict scaled_sum) {
  const float qmax = act_bits == 8 ? 127.f : 16383.f;
  const int64_t block_bytes = act_bits == 8 ? kBlock : 2 * kBlock;
  float buf[kBlock];
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n = std::min<int64_t>(kBlock, k - b * kBlock);
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) {
      buf[i] = i < n ? to_f32(x[b * kBlock + i]) : 0.f;
      amax = std::max(amax, std::fabs(buf[i]));
    }
    const float d = amax / qmax, inv = amax > 0.f ? qmax / amax : 0.f;
    int sum = 0;
    int8_t* dst = q + b * block_bytes;
    for (int64_t i = 0; i < kBlock; ++i) {
      const int v = static_cast<int>(std::nearbyint(buf[i] * inv));
      if (act_bits == 8) {
        dst[i] = static_cast<int8_t>(v);
      } else {
        dst[i] = static_cast<int8_t>(v >> 7);  // arithmetic shift: floor(v / 128), -128..127
        dst[kBlock + i] = static_cast<int8_t>(v & 127);
      }
      sum += v;
    }
    scale[b] = d;
    scaled_sum[b] = d * static_cast<float>(sum);
  }
}

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k, int64_t num_blocks, int64_t act_bits) {
  QuantizedRows r;
  r.num_blocks = num_blocks;
  r.block_bytes = act_bits == 8 ? kBlock : 2 * kBlock;
  r.stride = num_blocks * r.block_bytes;
  r.q.resize(rows * r.stride);
  r.scale.resize(rows * num_blocks);
  r.scaled_sum.resize(rows * num_blocks);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(x + m * k, k, num_blocks, act_bits, r.q.data() + m * r.stride, r.scale.data() + m * num_blocks,
                   r.scaled_sum.data() + m * num_blocks);
  });
  return r;
}

template <typename T>
inline void store_row(T* out, const float* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// Portable path: one row tile, one activation row.
template <typename T>
void tile_portable(const uint8_t* tiles, const Layout& L, int64_t tile, const QuantizedRows& a, int64_t m, T* out) {
  float acc[kTileRows] = {};
  for (int64_t b = 0; b < L.num_blocks; ++b) {
    const uint8_t* rec = tiles + (tile * L.num_blocks + b) * L.tile_bytes();
    const int8_t* aq = a.block(m, b);
    const bool split = a.block_bytes == 2 * kBlock;
    const float da = a.scale[m * a.num_blocks + b], sa = a.scaled_sum[m * a.num_blocks + b];
    for (int64_t l = 0; l < kTileRows; ++l) {
      int32_t dot = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int32_t x = split ? aq[i] * 128 + aq[kBlock + i] : aq[i];
        dot += tile_value(rec, L, l, i) * x;
      }
      acc[l] += tile_scale(rec, L, l, false) * (da * static_cast<float>(dot)) + tile_scale(rec, L, l, true) * sa;
    }
  }
  const int64_t n0 = tile * kTileRows;
  store_row(out + n0, acc, std::min<int64_t>(kTileRows, L.n - n0));
}

#if defined(PDSERVE_QUANT_AVX512)
inline __m512 load_scales(const uint8_t* p, int64_t scale_bytes) {
  if (scale_bytes == 2) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_loadu_ps(p);
}

template <typename T>
inline void store16(T* out, __m512 v, int64_t n) {
  alignas(64) float buf[kTileRows];
  _mm512_store_ps(buf, v);
  store_row(out, buf, n);
}

template <>
inline void store16<float>(float* out, __m512 v, int64_t n) {
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), v);
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Weights of inputs 4j..4j+3 (lo) and 16+4j..16+4j+3 (hi) of one tile, j = 0..3 (4-bit), or of inputs
// 4g..4g+3 for g = j and j + 4 (8-bit): 16 rows x 4 bytes each.
template <int BITS>
inline void tile_weights(const uint8_t* rec, int j, __m512i& lo, __m512i& hi) {
  if constexpr (BITS == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512(rec + j * 64);
    lo = _mm512_and_si512(v, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  } else {
    lo = _mm512_loadu_si512(rec + j * 64);
    hi = _mm512_loadu_si512(rec + (j + 4) * 64);
  }
}

// R activation rows x kGroupTiles row tiles (32 outputs), all input blocks. Each 4-input slice of a
// block's weights is unpacked once and used by every row; the R x G (x 2 with split activations)
// integer accumulators are independent chains, so the dot products' latency is hidden.
template <int R, int BITS, bool SPLIT, typename T>
void group_avx512(const uint8_t* tiles, const Layout& L, int64_t group, const QuantizedRows& a, int64_t m0,
                  T* out, int64_t out_stride) {
  constexpr int G = kGroupTiles;
  const int64_t TB = L.tile_bytes(), VB = L.value_bytes();
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < G; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* rec[G];
  for (int t = 0; t < G; ++t) rec[t] = tiles + ((group * G + t) * L.num_blocks) * TB;
  for (int64_t b = 0; b < L.num_blocks; ++b) {
    __m512i dot[R][G], dot_lo[R][G];  // dot_lo: the 7-bit low parts of split activations
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < G; ++t) dot[r][t] = dot_lo[r][t] = _mm512_setzero_si512();
    for (int t = 0; t < G; ++t) _mm_prefetch(reinterpret_cast<const char*>(rec[t] + 4 * TB), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      __m512i wlo[G], whi[G];
      for (int t = 0; t < G; ++t) tile_weights<BITS>(rec[t], j, wlo[t], whi[t]);
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a.block(m0 + r, b);
        const __m512i xlo = bcast4(x + 4 * j), xhi = bcast4(x + 16 + 4 * j);
        for (int t = 0; t < G; ++t) {
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], wlo[t], xlo);
          dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], whi[t], xhi);
        }
        if constexpr (SPLIT) {
          const __m512i ylo = bcast4(x + kBlock + 4 * j), yhi = bcast4(x + kBlock + 16 + 4 * j);
          for (int t = 0; t < G; ++t) {
            dot_lo[r][t] = _mm512_dpbusd_epi32(dot_lo[r][t], wlo[t], ylo);
            dot_lo[r][t] = _mm512_dpbusd_epi32(dot_lo[r][t], whi[t], yhi);
          }
        }
      }
    }
    for (int t = 0; t < G; ++t) {
      const __m512 scale = load_scales(rec[t] + VB, L.scale_bytes);
      const __m512 min = load_scales(rec[t] + VB + kTileRows * L.scale_bytes, L.scale_bytes);
      for (int r = 0; r < R; ++r) {
        const int64_t ab = (m0 + r) * a.num_blocks + b;
        __m512i d = dot[r][t];
        if constexpr (SPLIT) d = _mm512_add_epi32(_mm512_slli_epi32(d, 7), dot_lo[r][t]);  // x = hi * 128 + lo
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(scale, _mm512_set1_ps(a.scale[ab])),
                                    acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(min, _mm512_set1_ps(a.scaled_sum[ab]), acc[r][t]);
      }
      rec[t] += TB;
    }
  }
  for (int t = 0; t < G; ++t) {
    const int64_t n0 = (group * G + t) * kTileRows;
    if (n0 >= L.n) break;
    const int64_t n = std::min<int64_t>(kTileRows, L.n - n0);
    for (int r = 0; r < R; ++r) store16(out + (m0 + r) * out_stride + n0, acc[r][t], n);
  }
}

template <int BITS, bool SPLIT, typename T>
void rows_avx512(const uint8_t* tiles, const Layout& L, int64_t group, const QuantizedRows& a, int64_t m0,
                 int64_t m1, T* out, int64_t out_stride) {
  // Rows per pass: the accumulators, 2 x 2 x R vectors with split activations, must fit the 32 registers.
  constexpr int kRows = SPLIT ? 3 : 4;
  int64_t m = m0;
  for (; m + kRows <= m1; m += kRows) group_avx512<kRows, BITS, SPLIT>(tiles, L, group, a, m, out, out_stride);
  switch (m1 - m) {
    case 3: group_avx512<3, BITS, SPLIT>(tiles, L, group, a, m, out, out_stride); break;
    case 2: group_avx512<2, BITS, SPLIT>(tiles, L, group, a, m, out, out_stride); break;
    case 1: group_avx512<1, BITS, SPLIT>(tiles, L, group, a, m, out, out_stride); break;
    default: break;
  }
}
#endif

Layout check_layout(const at::Tensor& packed, int64_t bits, int64_t scale_bytes, int64_t n, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "quantized weights: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(scale_bytes == 2 || scale_bytes == 4, "quantized weights: scale_bytes must be 2 or 4");
  Layout L{bits, scale_bytes, n, k, 0, 0};
  L.num_blocks = (k + kBlock - 1) / kBlock;
  L.num_tiles = (n + kGroupTiles * kTileRows - 1) / (kGroupTiles * kTileRows) * kGroupTiles;
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "quantized weights must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(packed.numel() == L.num_tiles * L.num_blocks * L.tile_bytes(),
              "quantized weights: ", packed.numel(), " bytes do not fit the layout of a ", n, " x ", k, " weight");
  return L;
}

// y = x @ W^T: x (..., K) float32/bfloat16/float16 -> (..., N) in x's dtype. act_bits: 16 (15-bit
// activations) or 8; isa: 0 the best this build has, 1 portable.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t scale_bytes, int64_t n,
                        int64_t k, int64_t act_bits, int64_t isa) {
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "quant_linear: act_bits must be 8 or 16");
  const Layout L = check_layout(packed, bits, scale_bytes, n, k);
  TORCH_CHECK(x.device().is_cpu() && x.size(-1) == k, "quant_linear: x must be a CPU tensor with ", k, " columns");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.numel() / std::max<int64_t>(k, 1);
  std::vector<int64_t> shape(xc.sizes().begin(), xc.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, xc.options());
  if (rows == 0) return out;
  const uint8_t* tiles = packed.data_ptr<uint8_t>();
  PDSERVE_DISPATCH_FLOAT_TYPES(xc.scalar_type(), "quant_linear", [&] {
    const QuantizedRows a = quantize_rows(xc.data_ptr<scalar_t>(), rows, k, L.num_blocks, act_bits);
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t num_groups = L.num_tiles / kGroupTiles;
#if defined(PDSERVE_QUANT_AVX512)
    if (isa == 0) {
      at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
          const int64_t m1 = std::min(rows, m0 + kRowBlock);
          for (int64_t g = begin; g < end; ++g) {
            if (L.bits == 4 && act_bits == 16) rows_avx512<4, true>(tiles, L, g, a, m0, m1, y, n);
            else if (L.bits == 4) rows_avx512<4, false>(tiles, L, g, a, m0, m1, y, n);
            else if (act_bits == 16) rows_avx512<8, true>(tiles, L, g, a, m0, m1, y, n);
            else rows_avx512<8, false>(tiles, L, g, a, m0, m1, y, n);
          }
        }
      });
      return;
    }
#endif
    at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        for (int64_t t = g * kGroupTiles; t < (g + 1) * kGroupTiles && t * kTileRows < n; ++t)
          for (int64_t m = 0; m < rows; ++m) tile_portable(tiles, L, t, a, m, y + m * n);
    });
  });
  return out;
}

// out (len(ids), K) in out's dtype = rows ``ids`` of W, dequantized (embedding lookup).
void quant_embedding(at::Tensor out, const at::Tensor& ids, const at::Tensor& packed, int64_t bits,
                     int64_t scale_bytes, int64_t n, int64_t k) {
  const Layout L = check_layout(packed, bits, scale_bytes, n, k);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "quant_embedding: ids must be int64");
  TORCH_CHECK(out.is_contiguous() && out.numel() == ids.numel() * k, "quant_embedding: out must be (len(ids), K)");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) TORCH_CHECK(id[i] >= 0 && id[i] < n, "quant_embedding: id out of range");
  const uint8_t* tiles = packed.data_ptr<uint8_t>();
  PDSERVE_DISPATCH_FLOAT_TYPES(out.scalar_type(), "quant_embedding", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, ids.numel(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t tile = id[i] / kTileRows, l = id[i] % kTileRows;
        for (int64_t b = 0; b < L.num_blocks; ++b) {
          const uint8_t* rec = tiles + (tile * L.num_blocks + b) * L.tile_bytes();
          const float s = tile_scale(rec, L, l, false), mn = tile_scale(rec, L, l, true);
          for (int64_t j = 0; j < kBlock && b * kBlock + j < k; ++j)
            o[i * k + b * kBlock + j] = static_cast<scalar_t>(s * static_cast<float>(tile_value(rec, L, l, j)) + mn);
        }
      }
    });
  });
}

// Which path quant_linear's isa 0 takes on this build: "avx512_vnni" or "portable".
std::string quant_isa() {
#if defined(PDSERVE_QUANT_AVX512)
  return "avx512_vnni";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("quant_isa() -> str", &quant_isa);
  m.def("quant_linear(Tensor x, Tensor packed, int bits, int scale_bytes, int n, int k, int act_bits, int isa) -> "
        "Tensor");
  m.impl("quant_linear", c10::DispatchKey::CPU, &quant_linear);
  m.def("quant_embedding(Tensor(a!) out, Tensor ids, Tensor packed, int bits, int scale_bytes, int n, int k) -> ()");
  m.impl("quant_embedding", c10::DispatchKey::CPU, &quant_embedding);
}
