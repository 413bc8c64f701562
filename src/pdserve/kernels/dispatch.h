// The dtypes pdserve's CPU kernels run in (activations, and the KV cache, each one of them): float32,
// bfloat16 and float16. ATen's own dispatch: inside the lambda, scalar_t is the tensor's element type;
// any other dtype fails with "<name>" not implemented for '<dtype>'.
//
// The KV cache may also be float8_e4m3fn (--kv-cache-dtype fp8): values stored as they are, no scale (a
// scale of 1.0, as vLLM's uncalibrated fp8 KV cache), written saturated to +-448 and read back as float32.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <array>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PDSERVE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The KV cache's dtypes: the activations' and float8_e4m3fn.
#define PDSERVE_DISPATCH_KV_TYPES(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                             AT_DISPATCH_CASE(at::kFloat8_e4m3fn, __VA_ARGS__))

namespace pdserve {

using Fp8 = c10::Float8_e4m3fn;
constexpr float kFp8Max = 448.f;  // e4m3fn's largest finite value

// The 256 values of float8_e4m3fn as float32 (exact; the two NaN codes are never written, see to_fp8).
inline const std::array<float, 256> kFp8Values = [] {
  std::array<float, 256> t{};
  for (int i = 0; i < 256; ++i) t[i] = c10::detail::fp8e4m3fn_to_fp32_value(static_cast<uint8_t>(i));
  return t;
}();

inline float fp8_to_float(Fp8 x) { return kFp8Values[x.x]; }

// float32 -> float8_e4m3fn, rounded to nearest even, saturated at +-448 (c10's cast alone makes NaN of
// anything beyond).
inline Fp8 to_fp8(float x) { return Fp8(std::min(std::max(x, -kFp8Max), kFp8Max)); }

// n float8_e4m3fn values -> float32.
inline void fp8_to_float_row(const Fp8* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // e4m3 (s eeee mmm) placed in float16 (s eeeee mmmmmmmmmm) as s 0eeee mmm0000000 is the same number
  // times 2^-8, normal and subnormal alike (both biases differ by 8): widen to float32, multiply by 2^8.
  const __m256i magnitude = _mm256_set1_epi16(0x7F), sign = _mm256_set1_epi16(0x80);
  const __m512 two8 = _mm512_set1_ps(256.f);
  for (; i + 16 <= n; i += 16) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, sign), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(b, magnitude), 7));
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(h), two8));
  }
#endif
  for (; i < n; ++i) dst[i] = fp8_to_float(src[i]);
}

}  // namespace pdserve
