// Device pieces shared by the dgrad and wgrad kernels: the fused dReLU/dBN prologue.
#pragma once

#include "device_utils.cuh"
#include "kernels.h"

namespace resconv {

// dy of one element of output channel k (global index), from g, relu_out (o) and y, in fp32.
// Same operation order as the unfused path (resconv.ops._conv_backward.DyPrologue.materialize).
__device__ __forceinline__ float prologue_dy(const DyPrologueArgs& pro, int64_t k, float g, float o, float yv) {
  float v = pro.relu_out != nullptr ? relu_grad_mask(o, g) : g;
  v = v * __ldg(pro.a + k);
  if (pro.y != nullptr) v = v + __ldg(pro.b + k) * (yv - __ldg(pro.mean + k)) + __ldg(pro.c + k);
  return v;
}

// In place on one 16-byte vector of V channels k0 .. k0+V-1 that this thread copied into shared
// memory with cp.async (and has waited for): g (in sg) becomes dy rounded to T; relu_out / y
// are read from their staging copies sr / sy at the same offset. `valid` false: the vector lay
// outside dy (padding, rows past the end, channels past Kg) and becomes exact zeros.
template <typename T>
__device__ __forceinline__ void prologue_vector(const DyPrologueArgs& pro, unsigned char* sg, const unsigned char* sr,
                                                const unsigned char* sy, int64_t k0, bool valid) {
  constexpr int V = 16 / sizeof(T);
  Vec<T, V> out;
  if (!valid) {
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = from_float<T>(0.f);
  } else {
    const Vec<T, V> gv = *reinterpret_cast<const Vec<T, V>*>(sg);
    Vec<T, V> ov, yv;
    if (pro.relu_out != nullptr) ov = *reinterpret_cast<const Vec<T, V>*>(sr);
    if (pro.y != nullptr) yv = *reinterpret_cast<const Vec<T, V>*>(sy);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float o = pro.relu_out != nullptr ? to_float(ov.v[e]) : 0.f;
      const float y = pro.y != nullptr ? to_float(yv.v[e]) : 0.f;
      out.v[e] = from_float<T>(prologue_dy(pro, k0 + e, to_float(gv.v[e]), o, y));
    }
  }
  *reinterpret_cast<Vec<T, V>*>(sg) = out;
}

// One element read through strides (the SIMT kernels): dy itself, or formed by the prologue
// and rounded to T like the tensor-core path's operands. `off` is valid (checked by the caller).
template <typename T>
__device__ __forceinline__ float load_dy(const T* dy, const DyPrologueArgs& pro, int64_t off, int64_t k) {
  const float g = to_float(dy[off]);
  if (pro.a == nullptr) return g;
  const float o = pro.relu_out != nullptr ? to_float(static_cast<const T*>(pro.relu_out)[off]) : 0.f;
  const float y = pro.y != nullptr ? to_float(static_cast<const T*>(pro.y)[off]) : 0.f;
  return to_float(from_float<T>(prologue_dy(pro, k, g, o, y)));
}

}  // namespace resconv
