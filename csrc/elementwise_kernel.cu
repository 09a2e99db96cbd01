// Per-channel elementwise kernels over dense [N, K, P, Q] tensors (NCHW- or NHWC-dense, all
// operands of one call in the same layout):
//  * scale_shift_act: out = act((y - center[k]) * a[k] + b[k] + residual) — the BatchNorm apply
//    of training mode (centred: center = the batch mean) and, without a/b, the standalone
//    residual add + ReLU;
//  * bn_backward_dy: g = grad_out * (out > 0); grad_residual = g;
//    dy = a[k] * g + b[k] * (y - mean[k]) + c[k] — dReLU, the residual gradient and the dBN
//    input-gradient formula in one pass.
// fp32 arithmetic, one rounding per output, 64-bit offsets. Each thread handles V consecutive
// elements (V = 4 with vector loads when sizes and pointers allow, else 1).
#include <c10/cuda/CUDAException.h>

#include "device_utils.cuh"
#include "kernels.h"

namespace resconv {
namespace {

constexpr int kThreads = 256;

// Channel of consecutive flat indices, with one division for the first.
struct ChannelWalk {
  int64_t k = 0, l = 0;
  __device__ __forceinline__ ChannelWalk(int64_t idx, int64_t K, int64_t L, bool channels_last) {
    if (channels_last) {
      k = idx % K;
    } else {
      const int64_t t = idx / L;
      l = idx - t * L;
      k = t % K;
    }
  }
  __device__ __forceinline__ void next(int64_t K, int64_t L, bool channels_last) {
    if (channels_last) {
      if (++k == K) k = 0;
    } else if (++l == L) {
      l = 0;
      if (++k == K) k = 0;
    }
  }
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p, int64_t i) {
  return *reinterpret_cast<const Vec<T, V>*>(p + i);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scale_shift_act_kernel(const T* __restrict__ y, const T* __restrict__ res, T* __restrict__ out,
                           const float* __restrict__ a, const float* __restrict__ b,
                           const float* __restrict__ center, int64_t nvec, int64_t K, int64_t L, bool channels_last,
                           bool relu) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= nvec) return;
  const int64_t base = i * V;
  const Vec<T, V> yv = load_vec<T, V>(y, base);
  float v[V];
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = to_float(yv.v[e]);
  if (a != nullptr) {
    ChannelWalk ch(base, K, L, channels_last);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float centred = center != nullptr ? v[e] - center[ch.k] : v[e];
      v[e] = centred * a[ch.k] + b[ch.k];
      ch.next(K, L, channels_last);
    }
  }
  if (res != nullptr) {
    const Vec<T, V> rv = load_vec<T, V>(res, base);
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] += to_float(rv.v[e]);
  }
  Vec<T, V> o;
#pragma unroll
  for (int e = 0; e < V; ++e) o.v[e] = from_float<T>(relu ? relu_keep_nan(v[e]) : v[e]);
  *reinterpret_cast<Vec<T, V>*>(out + base) = o;
}

template <typename T, typename U, int V>
__global__ void __launch_bounds__(kThreads)
    bn_backward_dy_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ y,
                          U* __restrict__ dy, T* __restrict__ grad_res, const float* __restrict__ a,
                          const float* __restrict__ b, const float* __restrict__ c, const float* __restrict__ mean,
                          int64_t nvec, int64_t K, int64_t L, bool channels_last, bool relu) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= nvec) return;
  const int64_t base = i * V;
  const Vec<T, V> gv = load_vec<T, V>(grad_out, base);
  float g[V];
#pragma unroll
  for (int e = 0; e < V; ++e) g[e] = to_float(gv.v[e]);
  if (relu) {
    const Vec<T, V> ov = load_vec<T, V>(out, base);
#pragma unroll
    for (int e = 0; e < V; ++e) g[e] = relu_grad_mask(to_float(ov.v[e]), g[e]);
  }
  if (grad_res != nullptr) {
    Vec<T, V> r;
#pragma unroll
    for (int e = 0; e < V; ++e) r.v[e] = from_float<T>(g[e]);
    *reinterpret_cast<Vec<T, V>*>(grad_res + base) = r;
  }
  float yv[V];
  if (y != nullptr) {
    const Vec<T, V> t = load_vec<T, V>(y, base);
#pragma unroll
    for (int e = 0; e < V; ++e) yv[e] = to_float(t.v[e]);
  }
  ChannelWalk ch(base, K, L, channels_last);
  Vec<U, V> d;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const int64_t k = ch.k;
    float v = g[e] * a[k];
    if (y != nullptr) v += b[k] * (yv[e] - mean[k]) + c[k];
    d.v[e] = from_float<U>(v);
    ch.next(K, L, channels_last);
  }
  *reinterpret_cast<Vec<U, V>*>(dy + base) = d;
}

bool aligned(const void* p, int64_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned grid_for(int64_t nvec) {
  const int64_t blocks = (nvec + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "elementwise kernel: tensor too large (", nvec, " vectors)");
  return static_cast<unsigned>(blocks);
}

template <typename T>
void scale_shift_act_typed(const void* y, const void* res, void* out, const float* a, const float* b,
                           const float* center, int64_t numel, int64_t K, int64_t L, bool channels_last, bool relu,
                           cudaStream_t stream) {
  const T* yp = static_cast<const T*>(y);
  const T* rp = static_cast<const T*>(res);
  T* op = static_cast<T*>(out);
  constexpr int64_t vb = 4 * sizeof(T);
  if (numel % 4 == 0 && aligned(y, vb) && aligned(res, vb) && aligned(out, vb)) {
    const int64_t nvec = numel / 4;
    scale_shift_act_kernel<T, 4><<<grid_for(nvec), kThreads, 0, stream>>>(yp, rp, op, a, b, center, nvec, K, L,
                                                                          channels_last, relu);
  } else {
    scale_shift_act_kernel<T, 1><<<grid_for(numel), kThreads, 0, stream>>>(yp, rp, op, a, b, center, numel, K, L,
                                                                           channels_last, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename U>
void bn_backward_dy_typed(const void* grad_out, const void* out, const void* y, void* dy, void* grad_res,
                          const float* a, const float* b, const float* c, const float* mean, int64_t numel,
                          int64_t K, int64_t L, bool channels_last, bool relu, cudaStream_t stream) {
  const T* gp = static_cast<const T*>(grad_out);
  const T* op = static_cast<const T*>(out);
  const T* yp = static_cast<const T*>(y);
  U* dp = static_cast<U*>(dy);
  T* rp = static_cast<T*>(grad_res);
  constexpr int64_t vb = 4 * sizeof(T);
  if (numel % 4 == 0 && aligned(grad_out, vb) && aligned(out, vb) && aligned(y, vb) && aligned(grad_res, vb) &&
      aligned(dy, 4 * sizeof(U))) {
    const int64_t nvec = numel / 4;
    bn_backward_dy_kernel<T, U, 4><<<grid_for(nvec), kThreads, 0, stream>>>(gp, op, yp, dp, rp, a, b, c, mean,
                                                                            nvec, K, L, channels_last, relu);
  } else {
    bn_backward_dy_kernel<T, U, 1><<<grid_for(numel), kThreads, 0, stream>>>(gp, op, yp, dp, rp, a, b, c, mean,
                                                                             numel, K, L, channels_last, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_scale_shift_act(const void* y, const void* residual, void* out, const float* a, const float* b,
                            const float* center, DType dt, int64_t numel, int64_t K, int64_t L, bool channels_last,
                            bool relu, cudaStream_t stream) {
  switch (dt) {
    case DType::Half:
      scale_shift_act_typed<__half>(y, residual, out, a, b, center, numel, K, L, channels_last, relu, stream);
      break;
    case DType::BFloat16:
      scale_shift_act_typed<__nv_bfloat16>(y, residual, out, a, b, center, numel, K, L, channels_last, relu, stream);
      break;
    case DType::Float:
      scale_shift_act_typed<float>(y, residual, out, a, b, center, numel, K, L, channels_last, relu, stream);
      break;
    default:
      TORCH_CHECK(false, "scale_shift_act: unsupported dtype");
  }
}

void launch_bn_backward_dy(const void* grad_out, const void* out, const void* y, void* dy, void* grad_residual,
                           const float* a, const float* b, const float* c, const float* mean, DType dt,
                           DType dy_dt, int64_t numel, int64_t K, int64_t L, bool channels_last, bool relu,
                           cudaStream_t stream) {
  const bool f32 = dy_dt == DType::Float;
  TORCH_CHECK(f32 || dy_dt == dt, "bn_backward_dy: dy dtype must be the gradient's dtype or float32");
#define RESCONV_DY(T)                                                                                            \
  if (f32)                                                                                                       \
    bn_backward_dy_typed<T, float>(grad_out, out, y, dy, grad_residual, a, b, c, mean, numel, K, L,              \
                                   channels_last, relu, stream);                                                 \
  else                                                                                                           \
    bn_backward_dy_typed<T, T>(grad_out, out, y, dy, grad_residual, a, b, c, mean, numel, K, L, channels_last,  \
                               relu, stream);
  switch (dt) {
    case DType::Half:
      RESCONV_DY(__half)
      break;
    case DType::BFloat16:
      RESCONV_DY(__nv_bfloat16)
      break;
    case DType::Float:
      bn_backward_dy_typed<float, float>(grad_out, out, y, dy, grad_residual, a, b, c, mean, numel, K, L,
                                         channels_last, relu, stream);
      break;
    default:
      TORCH_CHECK(false, "bn_backward_dy: unsupported dtype");
  }
#undef RESCONV_DY
}

const char* probe_kernel_image(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, scale_shift_act_kernel<float, 1>);
    (void)cudaSetDevice(previous);
  }
  if (err == cudaSuccess) return nullptr;
  (void)cudaGetLastError();  // these errors are not sticky: clear them for later launches
  return cudaGetErrorString(err);
}

const char* compiled_arch_list() {
#define RESCONV_STR2(...) #__VA_ARGS__
#define RESCONV_STR(...) RESCONV_STR2(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
  return RESCONV_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace resconv
