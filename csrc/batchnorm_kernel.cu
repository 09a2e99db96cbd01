// BatchNorm statistics kernels: finalize (Chan merge of the conv's per-tile partials),
// the running-statistics update, and the backward reductions sum(g), sum(g * (y - mean)).
// Every reduction runs in a fixed order with no atomics: results are bitwise reproducible
// for a given launch configuration.
#include <c10/cuda/CUDAException.h>

#include "device_utils.cuh"
#include "kernels.h"

namespace resconv {
namespace {

// Column reductions over T rows of [T, K] fp32 buffers: block (32 channels) x (16 lanes),
// lane ty takes rows ty, ty + 16, ...; the 16 lane results are then merged in lane order. Over
// more than kTreeChunk rows, tree levels of such blocks run first (kernels.h).
constexpr int kColC = 32;
constexpr int kColT = 16;

// The block reduction of the finalize and of its tree levels: channel column tx (k < K), lane ty
// merges partials t0 + ty, t0 + ty + 16, ... < t1 relative to the block's first partial mean (a
// pivot: each merge then rounds at the scale of the partials' spread, not of a large common
// offset), then lane 0 merges the 16 lanes in order. For ty == 0 and k < K: (n, mean, m2),
// the mean absolute. Every thread of the block calls it (it synchronises).
__device__ __forceinline__ bool merge_partials(const float* __restrict__ count, const float* __restrict__ pmean,
                                               const float* __restrict__ pm2, int64_t t0, int64_t t1, int64_t K,
                                               int64_t k, float& n, float& mean, float& m2) {
  __shared__ float s_n[kColT][kColC];
  __shared__ float s_mean[kColT][kColC];
  __shared__ float s_m2[kColT][kColC];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const float pivot = (k < K && t1 > t0) ? pmean[t0 * K + k] : 0.f;
  n = 0.f, mean = 0.f, m2 = 0.f;
  if (k < K) {
    for (int64_t t = t0 + ty; t < t1; t += kColT)
      chan_combine(n, mean, m2, count[t], pmean[t * K + k] - pivot, pm2[t * K + k]);
  }
  s_n[ty][tx] = n;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
  if (ty != 0 || k >= K) return false;
  for (int j = 1; j < kColT; ++j) chan_combine(n, mean, m2, s_n[j][tx], s_mean[j][tx], s_m2[j][tx]);
  mean += pivot;
  return true;
}

__global__ void __launch_bounds__(kColC* kColT)
    bn_finalize_kernel(const float* __restrict__ count, const float* __restrict__ pmean,
                       const float* __restrict__ pm2, int64_t T, int64_t K, const float* __restrict__ gamma,
                       const float* __restrict__ beta, float eps, float* __restrict__ out_mean,
                       float* __restrict__ out_invstd, float* __restrict__ out_var, float* __restrict__ out_a,
                       float* __restrict__ out_b) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColC + threadIdx.x;
  float n, mean, m2;
  if (!merge_partials(count, pmean, pm2, 0, T, K, k, n, mean, m2)) return;
  if (n == 0.f) {  // an empty batch has no statistics: the identity normalisation (mean 0, var 1)
    mean = 0.f;
    m2 = 1.f;
    n = 1.f;
  }
  const float var = m2 / n;  // biased: normalises the batch
  const float invstd = 1.f / sqrtf(var + eps);
  const float a = gamma != nullptr ? gamma[k] * invstd : invstd;
  const float b = (beta != nullptr ? beta[k] : 0.f) - mean * a;
  out_mean[k] = mean;
  out_invstd[k] = invstd;
  out_var[k] = m2 / fmaxf(n - 1.f, 1.f);  // unbiased: feeds running_var
  out_a[k] = a;
  out_b[k] = b;
}

// One level of the finalize's tree: block (x = chunk, y = 32 channels) merges partials
// [x * kTreeChunk, (x + 1) * kTreeChunk) as the final kernel does (lane ty takes every 16th,
// relative to the chunk's first mean; then the 16 lanes in order) into partial x of the next
// level: out_count[x] (written by the first channel block), out_mean[x, k], out_m2[x, k].
__global__ void __launch_bounds__(kColC* kColT)
    bn_merge_level_kernel(const float* __restrict__ count, const float* __restrict__ pmean,
                          const float* __restrict__ pm2, int64_t T, int64_t K, float* __restrict__ out_count,
                          float* __restrict__ out_mean, float* __restrict__ out_m2) {
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColC + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTreeChunk;
  const int64_t t1 = t0 + kTreeChunk < T ? t0 + kTreeChunk : T;
  float n, mean, m2;
  if (!merge_partials(count, pmean, pm2, t0, t1, K, k, n, mean, m2)) return;
  out_mean[blockIdx.x * K + k] = mean;
  out_m2[blockIdx.x * K + k] = m2;
  if (k == 0) out_count[blockIdx.x] = n;
}

template <typename R, typename Acc>
__global__ void running_stats_kernel(R* __restrict__ running_mean, R* __restrict__ running_var,
                                     const float* __restrict__ mean, const float* __restrict__ var, int64_t K,
                                     Acc momentum) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const Acc keep = Acc(1) - momentum;
  if (running_mean != nullptr)
    running_mean[k] = static_cast<R>(static_cast<Acc>(running_mean[k]) * keep + static_cast<Acc>(mean[k]) * momentum);
  if (running_var != nullptr)
    running_var[k] = static_cast<R>(static_cast<Acc>(running_var[k]) * keep + static_cast<Acc>(var[k]) * momentum);
}

// Half types convert through float explicitly (their implicit conversions are ambiguous).
template <typename R>
__global__ void running_stats_half_kernel(R* __restrict__ running_mean, R* __restrict__ running_var,
                                          const float* __restrict__ mean, const float* __restrict__ var,
                                          int64_t K, float momentum) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const float keep = 1.f - momentum;
  if (running_mean != nullptr)
    running_mean[k] = from_float<R>(to_float(running_mean[k]) * keep + mean[k] * momentum);
  if (running_var != nullptr) running_var[k] = from_float<R>(to_float(running_var[k]) * keep + var[k] * momentum);
}

// ---- backward reductions ----------------------------------------------------------------
constexpr int kRedThreads = 256;
constexpr int kRedC = 32;  // channels per block

template <typename T>
__device__ __forceinline__ void masked_grad(const NKLView& g, const NKLView& o, const NKLView& y, const float mu,
                                            int64_t n, int64_t l, int64_t c, bool relu, bool has_y, float& acc_g,
                                            float& acc_gy) {
  float gv = to_float(static_cast<const T*>(g.data)[n * g.sn + l * g.sl + c * g.sk]);
  if (relu) {
    const float ov = to_float(static_cast<const T*>(o.data)[n * o.sn + l * o.sl + c * o.sk]);
    gv = relu_grad_mask(ov, gv);
  }
  acc_g += gv;
  if (has_y) acc_gy += gv * (to_float(static_cast<const T*>(y.data)[n * y.sn + l * y.sl + c * y.sk]) - mu);
}

// Partial sums over rows [r0, r0 + kReduceRows) of the flattened (n, l) index, for 32
// channels. Two thread mappings, chosen by the gradient's layout so that warps read
// contiguous memory: channels_fast (NHWC) puts channels on lanes, otherwise rows on lanes.
template <typename T>
__global__ void __launch_bounds__(kRedThreads)
    bn_backward_partials_kernel(NKLView g, NKLView o, NKLView y, const float* __restrict__ mean, int64_t NL,
                                int64_t K, int64_t L, bool relu, bool has_y, bool channels_fast,
                                float* __restrict__ partial_g, float* __restrict__ partial_gy) {
  __shared__ float s_g[kRedThreads / 32][32];
  __shared__ float s_gy[kRedThreads / 32][32];
  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kReduceRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kRedC;
  const int64_t prow = static_cast<int64_t>(blockIdx.x) * K;
  const int lane = tid & 31;
  const int wid = tid >> 5;  // 8 warps
  if (channels_fast) {
    // lane -> channel c0 + lane; warp wid -> rows r0 + wid + 8 i
    const int64_t c = c0 + lane;
    float acc_g = 0.f, acc_gy = 0.f;
    if (c < K) {
      const float mu = has_y ? mean[c] : 0.f;
      for (int i = 0; i < kReduceRows / 8; ++i) {
        const int64_t r = r0 + wid + 8 * i;
        if (r >= NL) break;
        masked_grad<T>(g, o, y, mu, r / L, r % L, c, relu, has_y, acc_g, acc_gy);
      }
    }
    s_g[wid][lane] = acc_g;
    s_gy[wid][lane] = acc_gy;
    __syncthreads();
    if (wid == 0 && c < K) {
      float sg = s_g[0][lane], sgy = s_gy[0][lane];
      for (int j = 1; j < kRedThreads / 32; ++j) {
        sg += s_g[j][lane];
        sgy += s_gy[j][lane];
      }
      partial_g[prow + c] = sg;
      if (has_y) partial_gy[prow + c] = sgy;
    }
  } else {
    // warp wid -> channels c0 + wid + 8 j; lane -> rows r0 + lane + 32 i; warp-shuffle sum.
    for (int j = 0; j < kRedC / 8; ++j) {
      const int64_t c = c0 + wid + 8 * j;
      if (c >= K) break;  // uniform across the warp
      const float mu = has_y ? mean[c] : 0.f;
      float acc_g = 0.f, acc_gy = 0.f;
      for (int i = 0; i < kReduceRows / 32; ++i) {
        const int64_t r = r0 + lane + 32 * i;
        if (r >= NL) break;
        masked_grad<T>(g, o, y, mu, r / L, r % L, c, relu, has_y, acc_g, acc_gy);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        acc_g += __shfl_xor_sync(0xffffffffu, acc_g, off);
        acc_gy += __shfl_xor_sync(0xffffffffu, acc_gy, off);
      }
      if (lane == 0) {
        partial_g[prow + c] = acc_g;
        if (has_y) partial_gy[prow + c] = acc_gy;
      }
    }
  }
}

// The block reduction of the backward sums and of their tree levels (as merge_partials): lane ty
// of channel column tx sums partials t0 + ty, t0 + ty + 16, ... < t1, lane 0 the 16 lanes in
// order. For ty == 0 and k < K: the sums. Every thread of the block calls it.
__device__ __forceinline__ bool sum_partials(const float* __restrict__ partial_g, const float* __restrict__ partial_gy,
                                             int64_t t0, int64_t t1, int64_t K, int64_t k, bool has_y, float& a,
                                             float& b) {
  __shared__ float s_g[kColT][kColC];
  __shared__ float s_gy[kColT][kColC];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  a = 0.f, b = 0.f;
  if (k < K) {
    for (int64_t t = t0 + ty; t < t1; t += kColT) {
      a += partial_g[t * K + k];
      if (has_y) b += partial_gy[t * K + k];
    }
  }
  s_g[ty][tx] = a;
  s_gy[ty][tx] = b;
  __syncthreads();
  if (ty != 0 || k >= K) return false;
  for (int j = 1; j < kColT; ++j) {
    a += s_g[j][tx];
    b += s_gy[j][tx];
  }
  return true;
}

// One level of the backward sums' tree: block (x = chunk, y = 32 channels) sums partials
// [x * kTreeChunk, (x + 1) * kTreeChunk) into partial x of the next level.
__global__ void __launch_bounds__(kColC* kColT)
    bn_sum_level_kernel(const float* __restrict__ partial_g, const float* __restrict__ partial_gy, int64_t T,
                        int64_t K, bool has_y, float* __restrict__ out_g, float* __restrict__ out_gy) {
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColC + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTreeChunk;
  const int64_t t1 = t0 + kTreeChunk < T ? t0 + kTreeChunk : T;
  float a, b;
  if (!sum_partials(partial_g, partial_gy, t0, t1, K, k, has_y, a, b)) return;
  out_g[blockIdx.x * K + k] = a;
  if (has_y) out_gy[blockIdx.x * K + k] = b;
}

__global__ void __launch_bounds__(kColC* kColT)
    bn_backward_sum_kernel(const float* __restrict__ partial_g, const float* __restrict__ partial_gy, int64_t T,
                           int64_t K, bool has_y, float* __restrict__ sum_g, float* __restrict__ sum_gy) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColC + threadIdx.x;
  float a, b;
  if (!sum_partials(partial_g, partial_gy, 0, T, K, k, has_y, a, b)) return;
  sum_g[k] = a;
  if (has_y) sum_gy[k] = b;
}

unsigned blocks_for(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

}  // namespace

void launch_bn_finalize(const float* count, const float* mean, const float* m2, int64_t T, int64_t K,
                        const float* gamma, const float* beta, double eps, float* out_mean, float* out_invstd,
                        float* out_var, float* out_a, float* out_b, float* workspace, cudaStream_t stream) {
  // Tree levels, ping-ponging between the two halves of the workspace (each sized for level 1).
  const int64_t T1 = tree_level_rows(T);
  float* bufs[2] = {workspace, workspace + (T1 + 2 * T1 * K)};
  int which = 0;
  while (T > kTreeChunk) {
    const int64_t Tn = tree_level_rows(T);
    float* oc = bufs[which];
    float* om = oc + T1;
    float* oq = om + T1 * K;
    bn_merge_level_kernel<<<dim3(static_cast<unsigned>(Tn), blocks_for(K, kColC)), dim3(kColC, kColT), 0, stream>>>(
        count, mean, m2, T, K, oc, om, oq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count = oc, mean = om, m2 = oq, T = Tn, which ^= 1;
  }
  bn_finalize_kernel<<<blocks_for(K, kColC), dim3(kColC, kColT), 0, stream>>>(
      count, mean, m2, T, K, gamma, beta, static_cast<float>(eps), out_mean, out_invstd, out_var, out_a, out_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_update_running_stats(void* running_mean, void* running_var, DType dt, const float* mean,
                                 const float* var_unbiased, int64_t K, double momentum, cudaStream_t stream) {
  const unsigned blocks = blocks_for(K, 256);
  switch (dt) {
    case DType::Float:
      running_stats_kernel<float, float><<<blocks, 256, 0, stream>>>(
          static_cast<float*>(running_mean), static_cast<float*>(running_var), mean, var_unbiased, K,
          static_cast<float>(momentum));
      break;
    case DType::Double:
      running_stats_kernel<double, double><<<blocks, 256, 0, stream>>>(
          static_cast<double*>(running_mean), static_cast<double*>(running_var), mean, var_unbiased, K, momentum);
      break;
    case DType::Half:
      running_stats_half_kernel<__half><<<blocks, 256, 0, stream>>>(
          static_cast<__half*>(running_mean), static_cast<__half*>(running_var), mean, var_unbiased, K,
          static_cast<float>(momentum));
      break;
    case DType::BFloat16:
      running_stats_half_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
          static_cast<__nv_bfloat16*>(running_mean), static_cast<__nv_bfloat16*>(running_var), mean, var_unbiased,
          K, static_cast<float>(momentum));
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bn_backward_reduce(NKLView grad_out, NKLView out, NKLView y, const float* mean, DType dt, int64_t N,
                               int64_t K, int64_t L, bool relu, float* partial_g, float* partial_gy, float* sum_g,
                               float* sum_gy, float* workspace, cudaStream_t stream) {
  const int64_t NL = N * L;
  const int64_t T = (NL + kReduceRows - 1) / kReduceRows;
  const bool has_y = y.data != nullptr;
  const bool channels_fast = grad_out.sk == 1 && K > 1;
  const dim3 grid(static_cast<unsigned>(T), blocks_for(K, kRedC));
  switch (dt) {
    case DType::Half:
      bn_backward_partials_kernel<__half><<<grid, kRedThreads, 0, stream>>>(
          grad_out, out, y, mean, NL, K, L, relu, has_y, channels_fast, partial_g, partial_gy);
      break;
    case DType::BFloat16:
      bn_backward_partials_kernel<__nv_bfloat16><<<grid, kRedThreads, 0, stream>>>(
          grad_out, out, y, mean, NL, K, L, relu, has_y, channels_fast, partial_g, partial_gy);
      break;
    case DType::Float:
      bn_backward_partials_kernel<float><<<grid, kRedThreads, 0, stream>>>(
          grad_out, out, y, mean, NL, K, L, relu, has_y, channels_fast, partial_g, partial_gy);
      break;
    default:
      TORCH_CHECK(false, "bn_backward_reduce: unsupported dtype");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Tree levels (as launch_bn_finalize's), then the last block.
  const int64_t T1 = tree_level_rows(T);
  float* bufs[2] = {workspace, workspace + 2 * T1 * K};
  const float* pg = partial_g;
  const float* pgy = partial_gy;
  int64_t t = T;
  int which = 0;
  while (t > kTreeChunk) {
    const int64_t tn = tree_level_rows(t);
    float* og = bufs[which];
    float* ogy = og + T1 * K;
    bn_sum_level_kernel<<<dim3(static_cast<unsigned>(tn), blocks_for(K, kColC)), dim3(kColC, kColT), 0, stream>>>(
        pg, pgy, t, K, has_y, og, ogy);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pg = og, pgy = ogy, t = tn, which ^= 1;
  }
  bn_backward_sum_kernel<<<blocks_for(K, kColC), dim3(kColC, kColT), 0, stream>>>(pg, pgy, t, K, has_y, sum_g,
                                                                                  sum_gy);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace resconv
