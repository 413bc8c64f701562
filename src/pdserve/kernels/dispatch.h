// The dtypes pdserve's CPU kernels run in (activations, and the KV cache, each one of them): float32,
// bfloat16 and float16. ATen's own dispatch: inside the lambda, scalar_t is the tensor's element type;
// any other dtype fails with "<name>" not implemented for '<dtype>'.
#pragma once

#include <ATen/Dispatch.h>

#define PDSERVE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
