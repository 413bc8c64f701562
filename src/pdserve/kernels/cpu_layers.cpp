// Fused element-wise layers on CPU, one pass over memory each where PyTorch takes several ops:
// residual add + RMSNorm, RMSNorm, and SiLU(gate) * up. Rounding follows Hugging Face's modules in the
// model's dtype: the residual sum is rounded to the dtype, the norm is computed in float32 and rounded
// before the weight multiplies it, SiLU is rounded before the product.
//
// Also RoPE of q and k fused with writing K and V into the paged cache.
//
// Registered as torch.ops.pdserve.{fused_add_rms_norm, rms_norm, silu_and_mul, rope_and_cache}, and
// silu_mul, qkv_rope_and_cache (the same, allocating their results).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dispatch.h"

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

inline float f32(float x) { return x; }
inline float f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float f32(c10::Half x) { return static_cast<float>(x); }

// One row: residual (if given) += x, then out = weight * dtype(norm(residual or x)).
template <typename T>
inline void norm_row(T* __restrict out, const T* __restrict x, T* __restrict residual, const T* __restrict weight,
                     int64_t n, float eps, float* __restrict buf) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) {
    float v = f32(x[i]);
    if (residual != nullptr) {
      const T sum = round_to<T>(v + f32(residual[i]));
      residual[i] = sum;
      v = f32(sum);
    }
    buf[i] = v;
    sq += v * v;
  }
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(f32(weight[i]) * f32(round_to<T>(buf[i] * inv)));
}

template <typename T>
void norm_rows(T* out, const T* x, T* residual, const T* weight, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r)
      norm_row(out + r * n, x + r * n, residual == nullptr ? nullptr : residual + r * n, weight, n, eps, buf.data());
  });
}

void check_rows(const at::Tensor& t, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == weight.numel() && weight.is_contiguous(),
              name, "'s last dimension must equal the weight's size");
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), name, " and weight must have one dtype");
}

template <typename F>
void dispatch(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", type);
  }
}

// In place: residual += x; x = weight * rms_norm(residual).
void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "x");
  check_rows(residual, weight, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have one shape");
  const int64_t n = weight.numel(), rows = x.numel() / n;
  dispatch(x.scalar_type(), "fused_add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    norm_rows<T>(x.data_ptr<T>(), x.data_ptr<T>(), residual.data_ptr<T>(), weight.data_ptr<T>(), rows, n,
                 static_cast<float>(eps));
  });
}

// out = weight * rms_norm(x).
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "x");
  check_rows(out, weight, "out");
  TORCH_CHECK(x.sizes() == out.sizes(), "x and out must have one shape");
  const int64_t n = weight.numel(), rows = x.numel() / n;
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    norm_rows<T>(out.data_ptr<T>(), x.data_ptr<T>(), nullptr, weight.data_ptr<T>(), rows, n, static_cast<float>(eps));
  });
}

// x: (rows, 2 * d) = [gate | up]; out: (rows, d) = dtype(silu(gate)) * up.
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && out.is_contiguous(), "contiguous CPU tensors expected");
  TORCH_CHECK(x.size(-1) % 2 == 0 && out.size(-1) * 2 == x.size(-1) && out.numel() * 2 == x.numel() &&
              out.scalar_type() == x.scalar_type(), "out must be x's shape with half the last dimension");
  const int64_t d = out.size(-1), rows = out.numel() / std::max<int64_t>(d, 1);
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* __restrict gate = in + r * 2 * d;
        const T* __restrict up = gate + d;
        T* __restrict dst = o + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          const float g = f32(gate[i]);
          dst[i] = round_to<T>(f32(round_to<T>(g / (1.f + std::exp(-g)))) * f32(up[i]));
        }
      }
    });
  });
}

// A value rounded to the model's dtype T, stored in the cache's C (float8_e4m3fn: saturated, see dispatch.h).
template <typename T, typename C>
inline C to_cache(float x) {
  if constexpr (std::is_same_v<C, pdserve::Fp8>) {
    return pdserve::to_fp8(f32(round_to<T>(x)));
  } else {
    return round_to<C>(x);
  }
}

// rope_and_cache's work for activations of dtype T and a cache of C (T, or float8_e4m3fn).
template <typename T, typename C>
void rope_rows(at::Tensor& q_out, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
               const at::Tensor& sin, C* k_cache, const int64_t* slot, int64_t slots, int64_t H, int64_t Hkv,
               int64_t D) {
  const int64_t half = D / 2, T_rows = qk.size(0);
  const T* qk_p = qk.data_ptr<T>();
  const T* v_p = v.data_ptr<T>();
  const T* cos_p = cos.data_ptr<T>();
  const T* sin_p = sin.data_ptr<T>();
  T* q_p = q_out.data_ptr<T>();
  C* v_cache = k_cache + slots * Hkv * D;
  const int64_t qk_row = qk.stride(0), v_row = v.stride(0);
  at::parallel_for(0, T_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* __restrict c = cos_p + t * half;
      const T* __restrict sn = sin_p + t * half;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        const T* __restrict x = qk_p + t * qk_row + h * D;
        if (h < H) {
          T* __restrict dst = q_p + (t * H + h) * D;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = f32(x[i]), x2 = f32(x[i + half]), ci = f32(c[i]), si = f32(sn[i]);
            dst[i] = round_to<T>(f32(round_to<T>(x1 * ci)) - f32(round_to<T>(x2 * si)));
            dst[i + half] = round_to<T>(f32(round_to<T>(x2 * ci)) + f32(round_to<T>(x1 * si)));
          }
        } else {
          C* __restrict dst = k_cache + (slot[t] * Hkv + h - H) * D;
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = f32(x[i]), x2 = f32(x[i + half]), ci = f32(c[i]), si = f32(sn[i]);
            dst[i] = to_cache<T, C>(f32(round_to<T>(x1 * ci)) - f32(round_to<T>(x2 * si)));
            dst[i + half] = to_cache<T, C>(f32(round_to<T>(x2 * ci)) + f32(round_to<T>(x1 * si)));
          }
        }
      }
      if constexpr (std::is_same_v<C, T>) {
        std::memcpy(v_cache + slot[t] * Hkv * D, v_p + t * v_row, Hkv * D * sizeof(T));
      } else {
        C* __restrict dst = v_cache + slot[t] * Hkv * D;
        for (int64_t i = 0; i < Hkv * D; ++i) dst[i] = to_cache<T, C>(f32(v_p[t * v_row + i]));
      }
    }
  });
}

// Rotary embedding of q and k, and the step's K/V written into the paged cache, in one pass over the
// tokens (where PyTorch takes a chunk, four products, two sums, a concatenation and two index copies):
// q_out (T, H, D) = rope(qk[:, :H]); at each token's slot, kv_cache[0] = rope(qk[:, H:]) and
// kv_cache[1] = v. qk (T, H + Hkv, D) and v (T, Hkv, D) may be row-strided views (of the QKV projection's
// output); cos, sin: (T, D / 2) at the tokens' positions. Rounding as Hugging Face's rotate-half form in
// the model's dtype: each product is rounded, then their sum. A float8_e4m3fn cache gets K and V rounded to
// the model's dtype, then saturated to +-448 and rounded to e4m3 (as the PyTorch path's cast).
void rope_and_cache(at::Tensor q_out, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                    const at::Tensor& sin, at::Tensor kv_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(qk.device().is_cpu() && kv_cache.device().is_cpu(), "rope_and_cache runs on CPU tensors");
  TORCH_CHECK(qk.dim() == 3 && v.dim() == 3 && q_out.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "rope_and_cache: bad shapes");
  const int64_t T = qk.size(0), D = qk.size(2), H = q_out.size(1), Hkv = v.size(1);
  TORCH_CHECK(qk.size(1) == H + Hkv && v.size(0) == T && q_out.size(0) == T && v.size(2) == D && q_out.size(2) == D &&
              kv_cache.size(3) == Hkv && kv_cache.size(4) == D && D % 2 == 0,
              "rope_and_cache: qk must be (T, H + Hkv, D), v (T, Hkv, D), q_out (T, H, D), the cache's heads Hkv");
  TORCH_CHECK(qk.stride(2) == 1 && qk.stride(1) == D && v.stride(2) == 1 && v.stride(1) == D &&
              q_out.is_contiguous() && kv_cache.is_contiguous(), "rope_and_cache: rows must have contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D / 2 && sin.numel() == T * D / 2,
              "rope_and_cache: cos and sin must be (T, D / 2)");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "rope_and_cache: slot_mapping must be (T,) int64");
  TORCH_CHECK(qk.scalar_type() == q_out.scalar_type() && v.scalar_type() == qk.scalar_type() &&
              cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type() &&
              (kv_cache.scalar_type() == qk.scalar_type() || kv_cache.scalar_type() == at::kFloat8_e4m3fn),
              "rope_and_cache: one dtype for all tensors (the cache's may be float8_e4m3fn)");
  const int64_t slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "rope_and_cache: slot out of range");
  dispatch(qk.scalar_type(), "rope_and_cache", [&](auto tag) {
    using T_ = decltype(tag);
    if (kv_cache.scalar_type() == at::kFloat8_e4m3fn)
      rope_rows<T_>(q_out, qk, v, cos, sin, kv_cache.data_ptr<pdserve::Fp8>(), slot, slots, H, Hkv, D);
    else
      rope_rows<T_>(q_out, qk, v, cos, sin, kv_cache.data_ptr<T_>(), slot, slots, H, Hkv, D);
  });
}

// The two ops above as functions that allocate their results, from the QKV projection's output itself:
// one call from Python each where the model took four to six (slices, views, an empty tensor); single
// requests decode at a few ms a token, where every dispatch from Python (~5 us) counts.
at::Tensor silu_mul(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  TORCH_CHECK(!shape.empty(), "silu_mul: x must have a last dimension");
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, x.options());
  silu_and_mul(out, x);
  return out;
}

// qkv (T, (H + 2 * Hkv) * D), the QKV projection's output -> q (T, H, D) roped; K roped and V written into
// the cache at the tokens' slots.
at::Tensor qkv_rope_and_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv_cache,
                              const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && kv_cache.dim() == 5, "qkv_rope_and_cache: qkv must be (T, (H + 2 Hkv) D)");
  const int64_t T = qkv.size(0), D = kv_cache.size(4), H = num_heads, Hkv = num_kv_heads;
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && qkv.stride(1) == 1, "qkv_rope_and_cache: qkv has ", qkv.size(1),
              " columns, expected (", H, " + 2 * ", Hkv, ") * ", D);
  const at::Tensor qk = qkv.narrow(1, 0, (H + Hkv) * D).view({T, H + Hkv, D});
  const at::Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({T, Hkv, D});
  at::Tensor q = at::empty({T, H, D}, qkv.options());
  rope_and_cache(q, qk, v, cos, sin, kv_cache, slot_mapping);
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("silu_mul(Tensor x) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
  m.def("qkv_rope_and_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "int num_heads, int num_kv_heads) -> Tensor");
  m.impl("qkv_rope_and_cache", c10::DispatchKey::CPU, &qkv_rope_and_cache);
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.impl("fused_add_rms_norm", c10::DispatchKey::CPU, &fused_add_rms_norm);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rope_and_cache(Tensor(a!) q_out, Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(b!) kv_cache, "
        "Tensor slot_mapping) -> ()");
  m.impl("rope_and_cache", c10::DispatchKey::CPU, &rope_and_cache);
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
}
